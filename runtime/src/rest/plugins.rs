//! `/connector-plugins`: the connectors (and, with `connectorsOnly=false`, the transforms and
//! predicates) this worker can run, their config definitions, and config validation.

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::body::JsonBody;
use super::{ApiError, ApiResult, RestState, parse_body, string_map};
use crate::transform::{predicate_plugins, transform_plugins};
use crate::worker::connector_config as cc;

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    #[serde(rename = "connectorsOnly", default = "yes")]
    connectors_only: bool,
}

fn yes() -> bool {
    true
}

pub async fn list(State(state): State<RestState>, Query(query): Query<ListQuery>) -> Json<Value> {
    let mut plugins: Vec<Value> = state
        .herder
        .plugins()
        .all()
        .iter()
        .map(|p| {
            json!({
                "class": p.connector().class(),
                "type": p.kind().as_str(),
                "version": p.connector().version(),
            })
        })
        .collect();
    if !query.connectors_only {
        let version = env!("CARGO_PKG_VERSION");
        plugins.extend(
            transform_plugins()
                .iter()
                .map(|t| json!({"class": t.class, "type": "transformation", "version": version})),
        );
        plugins.extend(
            predicate_plugins()
                .iter()
                .map(|p| json!({"class": p.class, "type": "predicate", "version": version})),
        );
    }
    Json(Value::Array(plugins))
}

pub async fn config(
    State(state): State<RestState>,
    Path(plugin): Path<String>,
) -> ApiResult<Json<Value>> {
    if let Some(found) = state.herder.plugins().find(&plugin) {
        let def = found.connector().config_def();
        return Ok(Json(Value::Array(
            def.keys()
                .iter()
                .enumerate()
                .map(|(i, k)| k.definition_json(i))
                .collect(),
        )));
    }
    let transform = transform_plugins()
        .into_iter()
        .find(|t| t.class == plugin || t.aliases.contains(&plugin.as_str()));
    if let Some(transform) = transform {
        let def = (transform.config_def)();
        return Ok(Json(Value::Array(
            def.keys()
                .iter()
                .enumerate()
                .map(|(i, k)| k.definition_json(i))
                .collect(),
        )));
    }
    Err(ApiError::not_found(format!(
        "Failed to find any class that implements Connector and which name matches {plugin}"
    )))
}

pub async fn validate(
    State(state): State<RestState>,
    Path(plugin): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<Value>> {
    let value: Value = parse_body(&body)?;
    let config = string_map(&value, "config")?;
    if let Some(class) = config.get(cc::CLASS)
        && state
            .herder
            .plugins()
            .find(class)
            .map(|p| p.connector().class())
            != state
                .herder
                .plugins()
                .find(&plugin)
                .map(|p| p.connector().class())
    {
        return Err(ApiError::bad_request(
            "Included connector type does not match request type",
        ));
    }
    let validation = state.herder.validate(&plugin, &config).await?;
    let configs: Vec<Value> = validation
        .values
        .iter()
        .map(|value| {
            let definition = validation
                .definitions
                .iter()
                .find(|d| d["name"] == value.name)
                .cloned()
                .unwrap_or_else(|| json!({"name": value.name}));
            json!({ "definition": definition, "value": value })
        })
        .collect();
    Ok(Json(json!({
        "name": validation.class,
        "error_count": validation.error_count(),
        "groups": validation.groups,
        "configs": configs,
    })))
}
