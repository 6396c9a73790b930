//! `/connectors/...` handlers.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::body::JsonBody;
use super::{ApiError, ApiResult, RestState, check_config_size, parse_body, string_map};
use crate::store::{TargetState, TaskStatus};
use crate::worker::connector_name;
use crate::worker::herder::{ConnectorInfo, ConnectorStatus};

fn info_json(info: &ConnectorInfo) -> Value {
    json!({
        "name": info.name,
        "config": info.config,
        "tasks": info.tasks.iter().map(|t| json!({"connector": info.name, "task": t})).collect::<Vec<_>>(),
        "type": info.kind.as_str(),
    })
}

fn state_json(status: &TaskStatus) -> Map<String, Value> {
    let mut object = Map::new();
    object.insert("state".into(), json!(status.state));
    object.insert("worker_id".into(), json!(status.worker_id));
    if let Some(trace) = &status.trace {
        object.insert("trace".into(), json!(trace));
    }
    object
}

fn status_json(status: &ConnectorStatus) -> Value {
    let tasks: Vec<Value> = status
        .tasks
        .iter()
        .map(|(id, task)| {
            let mut object = Map::new();
            object.insert("id".into(), json!(id));
            object.extend(state_json(task));
            Value::Object(object)
        })
        .collect();
    json!({
        "name": status.name,
        "connector": state_json(&status.connector),
        "tasks": tasks,
        "type": status.kind.as_str(),
    })
}

pub async fn list(
    State(state): State<RestState>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Value>> {
    let expand: Vec<String> = query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.strip_prefix("expand="))
        .map(str::to_string)
        .collect();
    let names = state.herder.connector_names();
    if expand.is_empty() {
        return Ok(Json(json!(names)));
    }
    let mut result = Map::new();
    for name in names {
        let mut entry = Map::new();
        for what in &expand {
            match what.as_str() {
                // A connector deleted meanwhile is simply left out.
                "status" => {
                    if let Ok(status) = state.herder.status(&name) {
                        entry.insert("status".into(), status_json(&status));
                    }
                }
                "info" => {
                    if let Ok(info) = state.herder.info(&name) {
                        entry.insert("info".into(), info_json(&info));
                    }
                }
                other => {
                    return Err(ApiError::bad_request(format!(
                        "Unknown expand value '{other}': use status or info"
                    )));
                }
            }
        }
        result.insert(name, Value::Object(entry));
    }
    Ok(Json(Value::Object(result)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    name: Option<String>,
    config: Option<Value>,
    initial_state: Option<String>,
}

pub async fn create(
    State(state): State<RestState>,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    let request: CreateRequest = parse_body(&body)?;
    let config = string_map(request.config.as_ref().unwrap_or(&json!({})), "config")?;
    // As Connect: the name is trimmed (Java's trim: every char up to ' '), then checked
    // before anything is written.
    let name = request
        .name
        .or_else(|| config.get("name").cloned())
        .unwrap_or_default();
    let name = connector_name::trim(&name).to_string();
    connector_name::check(&name).map_err(ApiError::bad_request)?;
    check_config_size(&state, &config)?;
    let initial = match request.initial_state.as_deref() {
        None => None,
        Some("RUNNING") => Some(TargetState::Started),
        Some("PAUSED") => Some(TargetState::Paused),
        Some("STOPPED") => Some(TargetState::Stopped),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Invalid initial_state '{other}': use RUNNING, PAUSED or STOPPED"
            )));
        }
    };
    let info = state.herder.create(&name, config, initial).await?;
    Ok((
        StatusCode::CREATED,
        [(
            header::LOCATION,
            format!("/connectors/{}", connector_name::path_segment(&name)),
        )],
        Json(info_json(&info)),
    )
        .into_response())
}

pub async fn info(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(info_json(&state.herder.info(&name)?)))
}

pub async fn delete(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    state.herder.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn config(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!(state.herder.config(&name)?)))
}

pub async fn put_config(
    State(state): State<RestState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    connector_name::check(&name).map_err(ApiError::bad_request)?;
    let value: Value = parse_body(&body)?;
    let config = string_map(&value, "config")?;
    check_config_size(&state, &config)?;
    let (created, info) = state.herder.put_config(&name, config).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info_json(&info))).into_response())
}

pub async fn patch_config(
    State(state): State<RestState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let value: Value = parse_body(&body)?;
    let object = value
        .as_object()
        .ok_or_else(|| ApiError::bad_request("config patch must be a JSON object"))?;
    let mut patch = BTreeMap::new();
    for (key, value) in object {
        let value = match value {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "config patch: value of '{key}' must be a string or null"
                )));
            }
        };
        patch.insert(key.clone(), value);
    }
    // The patched config must fit the config topic too; a connector not found is the
    // herder's 404 below.
    if let Ok(mut patched) = state.herder.config(&name) {
        for (key, value) in &patch {
            match value {
                Some(value) => patched.insert(key.clone(), value.clone()),
                None => patched.remove(key),
            };
        }
        check_config_size(&state, &patched)?;
    }
    Ok(Json(info_json(
        &state.herder.patch_config(&name, patch).await?,
    )))
}

pub async fn status(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(status_json(&state.herder.status(&name)?)))
}

pub async fn tasks(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let tasks = state.herder.task_configs(&name)?;
    Ok(Json(Value::Array(
        tasks
            .into_iter()
            .map(|(id, config)| json!({"id": {"connector": name, "task": id}, "config": config}))
            .collect(),
    )))
}

pub async fn task_status(
    State(state): State<RestState>,
    Path((name, task)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let id = task_id(&name, &task)?;
    let status = state.herder.task_status(&name, id)?;
    let mut object = Map::new();
    object.insert("id".into(), json!(id));
    object.extend(state_json(&status));
    Ok(Json(Value::Object(object)))
}

fn task_id(name: &str, task: &str) -> ApiResult<u32> {
    task.parse()
        .map_err(|_| ApiError::not_found(format!("Task {task} not found for connector {name}")))
}

pub async fn restart_task(
    State(state): State<RestState>,
    Path((name, task)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    state
        .herder
        .restart_task(&name, task_id(&name, &task)?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
pub struct RestartQuery {
    #[serde(rename = "includeTasks", default)]
    include_tasks: bool,
    #[serde(rename = "onlyFailed", default)]
    only_failed: bool,
}

pub async fn restart(
    State(state): State<RestState>,
    Path(name): Path<String>,
    Query(query): Query<RestartQuery>,
) -> ApiResult<Response> {
    let restarted = state
        .herder
        .restart(&name, query.include_tasks, query.only_failed)
        .await?;
    // The tasks that run on other workers restart there.
    for task in restarted {
        if let Err(reason) = super::forward::restart_elsewhere(&state, &name, task).await {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("Cannot restart task {task} of {name}: {reason}"),
            ));
        }
    }
    if !query.include_tasks && !query.only_failed {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(status_json(&state.herder.status(&name)?)),
    )
        .into_response())
}

pub async fn pause(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    state
        .herder
        .set_target_state(&name, TargetState::Paused)
        .await?;
    Ok(StatusCode::ACCEPTED)
}

pub async fn resume(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    state
        .herder
        .set_target_state(&name, TargetState::Started)
        .await?;
    Ok(StatusCode::ACCEPTED)
}

pub async fn stop(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    state
        .herder
        .set_target_state(&name, TargetState::Stopped)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn offsets(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let offsets = state.herder.offsets(&name).await?;
    Ok(Json(json!({
        "offsets": offsets.into_iter().map(|(p, o)| json!({"partition": p, "offset": o})).collect::<Vec<_>>(),
    })))
}

pub async fn alter_offsets(
    State(state): State<RestState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let value: Value = parse_body(&body)?;
    let entries = value
        .get("offsets")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad_request("The body must be {\"offsets\": [{\"partition\": {...}, \"offset\": {...} | null}]}"))?;
    if entries.is_empty() {
        return Err(ApiError::bad_request(
            "The \"offsets\" list must not be empty",
        ));
    }
    let mut offsets = Vec::with_capacity(entries.len());
    for entry in entries {
        let partition = entry
            .get("partition")
            .and_then(Value::as_object)
            .ok_or_else(|| ApiError::bad_request("Each entry needs a \"partition\" object"))?;
        let offset = match entry.get("offset") {
            None | Some(Value::Null) => None,
            Some(Value::Object(o)) => Some(o.clone()),
            Some(_) => {
                return Err(ApiError::bad_request(
                    "An \"offset\" must be an object or null",
                ));
            }
        };
        offsets.push((partition.clone(), offset));
    }
    state.herder.alter_offsets(&name, offsets).await?;
    Ok(Json(
        json!({"message": "The offsets for this connector have been altered successfully"}),
    ))
}

pub async fn reset_offsets(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    state.herder.reset_offsets(&name).await?;
    Ok(Json(
        json!({"message": "The offsets for this connector have been reset successfully"}),
    ))
}

pub async fn topics(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let topics = state.herder.topics(&name)?;
    Ok(Json(json!({ name: { "topics": topics } })))
}

pub async fn reset_topics(
    State(state): State<RestState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    state.herder.reset_topics(&name).await?;
    Ok(StatusCode::ACCEPTED)
}
