//! KIP-495's `/admin/loggers`: log levels read and changed at run time.
//!
//! A "logger" is a tracing target prefix (`medconnect_runtime::task`, `rdkafka`), as in an
//! `EnvFilter` directive; `root` is the default level. [`LogLevels`] keeps the levels it knows
//! (those of the start-up filter, then every change) and turns them back into an `EnvFilter`.
//! It does not own the process's subscriber: the `medconnect` binary installs one with a
//! reload handle and gives [`LogLevels::apply_with`] a function that swaps the filter in. An
//! in-process worker (the tests) has its own subscriber and no such function: the endpoints
//! still answer and record the levels, they just steer nothing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use thiserror::Error;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

use super::body::JsonBody;
use super::{ApiError, ApiResult, RestState, parse_body};

/// Connect's name for the default level.
pub const ROOT: &str = "root";

#[derive(Debug, Error)]
pub enum LogLevelError {
    #[error("Invalid log level '{0}'")]
    UnknownLevel(String),
    #[error("invalid log filter: {0}")]
    Filter(String),
}

/// Swaps the process's filter; given by whoever installed the subscriber.
type Apply = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Log levels by logger, shared by the REST API and whoever installed the subscriber.
#[derive(Clone)]
pub struct LogLevels {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    root: LevelFilter,
    /// When root was last set through the API (ms since the epoch).
    root_modified: Option<u64>,
    /// Explicit levels, with when they were last set through the API (ms since the epoch).
    loggers: BTreeMap<String, (LevelFilter, Option<u64>)>,
    /// Start-up directives with span or field filters: kept as given, not shown as loggers.
    other_directives: Vec<String>,
    apply: Option<Apply>,
}

impl Default for LogLevels {
    /// `info` for everything, steering nothing.
    fn default() -> Self {
        Self::from_parts(LevelFilter::INFO, BTreeMap::new(), Vec::new())
    }
}

impl LogLevels {
    fn from_parts(
        root: LevelFilter,
        loggers: BTreeMap<String, (LevelFilter, Option<u64>)>,
        other_directives: Vec<String>,
    ) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                root,
                root_modified: None,
                loggers,
                other_directives,
                apply: None,
            })),
        }
    }

    /// Reads `EnvFilter` directives (`info,rdkafka=warn,medconnect_runtime::task=debug`).
    pub fn from_directives(text: &str) -> Result<Self, LogLevelError> {
        // Let EnvFilter judge the syntax, so what is accepted here is what it accepts.
        EnvFilter::try_new(text).map_err(|e| LogLevelError::Filter(e.to_string()))?;
        let mut root = LevelFilter::ERROR;
        let mut loggers = BTreeMap::new();
        let mut other = Vec::new();
        for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            if directive.contains(['[', '{']) {
                other.push(directive.to_string());
                continue;
            }
            match directive.split_once('=') {
                Some((target, level)) => {
                    let level = parse_tracing_level(level)?;
                    loggers.insert(target.to_string(), (level, None));
                }
                None => match parse_tracing_level(directive) {
                    Ok(level) => root = level,
                    // A bare target enables everything for it.
                    Err(_) => {
                        loggers.insert(directive.to_string(), (LevelFilter::TRACE, None));
                    }
                },
            }
        }
        Ok(Self::from_parts(root, loggers, other))
    }

    /// From now on every change is applied through `apply` (e.g. a `reload::Handle`).
    pub fn apply_with(
        &self,
        apply: impl Fn(EnvFilter) -> Result<(), String> + Send + Sync + 'static,
    ) {
        self.lock().apply = Some(Box::new(apply));
    }

    /// The filter these levels describe.
    pub fn env_filter(&self) -> Result<EnvFilter, LogLevelError> {
        self.lock().env_filter()
    }

    /// Every logger with a level of its own, and `root`.
    pub fn all(&self) -> BTreeMap<String, (LevelFilter, Option<u64>)> {
        let inner = self.lock();
        let mut all = inner.loggers.clone();
        all.insert(ROOT.into(), (inner.root, inner.root_modified));
        all
    }

    /// The level that applies to `logger`: its own, else its nearest ancestor's, else root's.
    pub fn level(&self, logger: &str) -> LevelFilter {
        let inner = self.lock();
        if logger == ROOT {
            return inner.root;
        }
        inner
            .loggers
            .iter()
            .filter(|(name, _)| is_within(logger, name))
            .max_by_key(|(name, _)| name.len())
            .map_or(inner.root, |(_, (level, _))| *level)
    }

    /// Sets `logger` and every logger below it (all of them for `root`), as Connect does;
    /// returns the loggers whose level was set.
    pub fn set(&self, logger: &str, level: LevelFilter) -> Result<Vec<String>, LogLevelError> {
        let mut inner = self.lock();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let previous = (inner.root, inner.loggers.clone());
        let mut affected: Vec<String> = inner
            .loggers
            .keys()
            .filter(|name| logger == ROOT || is_within(name, logger))
            .cloned()
            .collect();
        if logger == ROOT {
            inner.root = level;
            affected.insert(0, ROOT.into());
        } else if !affected.iter().any(|name| name == logger) {
            affected.insert(0, logger.to_string());
        }
        for name in affected.iter().filter(|name| *name != ROOT) {
            inner.loggers.insert(name.clone(), (level, Some(now)));
        }
        if let Err(error) = inner.reapply() {
            (inner.root, inner.loggers) = previous;
            return Err(error);
        }
        if logger == ROOT {
            inner.root_modified = Some(now);
        }
        Ok(affected)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Inner {
    fn directives(&self) -> String {
        let mut directives = vec![self.root.to_string()];
        directives.extend(
            self.loggers
                .iter()
                .map(|(name, (level, _))| format!("{name}={level}")),
        );
        directives.extend(self.other_directives.iter().cloned());
        directives.join(",")
    }

    fn env_filter(&self) -> Result<EnvFilter, LogLevelError> {
        EnvFilter::try_new(self.directives()).map_err(|e| LogLevelError::Filter(e.to_string()))
    }

    fn reapply(&self) -> Result<(), LogLevelError> {
        let filter = self.env_filter()?;
        match &self.apply {
            Some(apply) => apply(filter).map_err(LogLevelError::Filter),
            None => Ok(()),
        }
    }
}

/// Whether `logger` is `ancestor` or below it (`a::b` is below `a`; `ab` is not).
fn is_within(logger: &str, ancestor: &str) -> bool {
    logger == ancestor
        || logger
            .strip_prefix(ancestor)
            .is_some_and(|rest| rest.starts_with("::"))
}

fn parse_tracing_level(text: &str) -> Result<LevelFilter, LogLevelError> {
    text.trim()
        .parse()
        .map_err(|_| LogLevelError::UnknownLevel(text.to_string()))
}

/// Connect's (log4j's) level names. FATAL has no tracing equivalent above ERROR, ALL none
/// below TRACE: they map to the nearest.
pub fn parse_connect_level(text: &str) -> Result<LevelFilter, LogLevelError> {
    match text.trim().to_ascii_uppercase().as_str() {
        "OFF" => Ok(LevelFilter::OFF),
        "FATAL" | "ERROR" => Ok(LevelFilter::ERROR),
        "WARN" => Ok(LevelFilter::WARN),
        "INFO" => Ok(LevelFilter::INFO),
        "DEBUG" => Ok(LevelFilter::DEBUG),
        "TRACE" | "ALL" => Ok(LevelFilter::TRACE),
        _ => Err(LogLevelError::UnknownLevel(text.to_string())),
    }
}

/// Connect's spelling of a level.
pub fn connect_level_name(level: LevelFilter) -> String {
    level.to_string().to_ascii_uppercase()
}

fn level_json(level: LevelFilter, last_modified: Option<u64>) -> Value {
    let mut object = Map::new();
    object.insert("level".into(), json!(connect_level_name(level)));
    object.insert("last_modified".into(), json!(last_modified));
    Value::Object(object)
}

/// `GET /admin/loggers`: `{logger: {"level": ..., "last_modified": ms | null}}`.
pub async fn list(State(state): State<RestState>) -> Json<Value> {
    Json(Value::Object(
        state
            .log_levels
            .all()
            .into_iter()
            .map(|(name, (level, modified))| (name, level_json(level, modified)))
            .collect(),
    ))
}

/// `GET /admin/loggers/{logger}`: the level that applies to it.
pub async fn get(State(state): State<RestState>, Path(logger): Path<String>) -> Json<Value> {
    let level = state.log_levels.level(&logger);
    Json(json!({ "level": connect_level_name(level) }))
}

#[derive(Debug, Deserialize)]
pub struct ScopeQuery {
    scope: Option<String>,
}

/// `PUT /admin/loggers/{logger}` with `{"level": "DEBUG"}`: the list of loggers it set.
/// `?scope=cluster` answers 204 as Connect does; with one worker per group (today) this
/// worker is the cluster.
pub async fn put(
    State(state): State<RestState>,
    Path(logger): Path<String>,
    Query(query): Query<ScopeQuery>,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    let request: Value = parse_body(&body)?;
    let level = request
        .get("level")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ApiError::bad_request("Desired 'level' parameter was not specified in the request.")
        })?;
    let level = parse_connect_level(level).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let cluster = match query
        .scope
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("worker") => false,
        Some("cluster") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Invalid scope '{other}': use worker or cluster"
            )));
        }
    };
    let affected = state
        .log_levels
        .set(&logger, level)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    tracing::info!(logger = %logger.escape_debug(), level = %level, "log level changed");
    if cluster {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok(Json(json!(affected)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::reload;

    #[test]
    fn reads_directives_and_resolves_levels() {
        let levels =
            LogLevels::from_directives("info,rdkafka=warn,medconnect_runtime::task=debug").unwrap();
        assert_eq!(levels.level(ROOT), LevelFilter::INFO);
        assert_eq!(levels.level("rdkafka"), LevelFilter::WARN);
        assert_eq!(
            levels.level("medconnect_runtime::task::source"),
            LevelFilter::DEBUG
        );
        assert_eq!(levels.level("medconnect_runtime::taskx"), LevelFilter::INFO);
        assert_eq!(levels.all().len(), 3);
    }

    #[test]
    fn setting_a_logger_sets_those_below_it() {
        let levels = LogLevels::from_directives("info,a::b=warn,a::c::d=error,ab=warn").unwrap();
        let affected = levels.set("a", LevelFilter::DEBUG).unwrap();
        assert_eq!(affected, ["a", "a::b", "a::c::d"]);
        assert_eq!(levels.level("ab"), LevelFilter::WARN);
        let affected = levels.set(ROOT, LevelFilter::TRACE).unwrap();
        assert_eq!(affected.len(), 5, "{affected:?}");
        assert!(
            levels
                .all()
                .values()
                .all(|(l, m)| *l == LevelFilter::TRACE && m.is_some())
        );
    }

    #[test]
    fn connect_level_names() {
        assert_eq!(parse_connect_level("debug").unwrap(), LevelFilter::DEBUG);
        assert_eq!(parse_connect_level("WARN").unwrap(), LevelFilter::WARN);
        assert!(parse_connect_level("VERBOSE").is_err());
        assert_eq!(connect_level_name(LevelFilter::WARN), "WARN");
    }

    #[test]
    fn a_change_reaches_the_subscriber_through_its_reload_handle() {
        let levels = LogLevels::from_directives("info").unwrap();
        let (filter, handle) = reload::Layer::new(levels.env_filter().unwrap());
        levels.apply_with(move |filter| handle.reload(filter).map_err(|e| e.to_string()));
        let subscriber = tracing_subscriber::registry().with(filter);
        tracing::subscriber::with_default(subscriber, || {
            assert!(!tracing::enabled!(target: "medconnect_runtime::task", Level::DEBUG));
            levels
                .set("medconnect_runtime", LevelFilter::DEBUG)
                .unwrap();
            assert!(tracing::enabled!(target: "medconnect_runtime::task", Level::DEBUG));
            assert!(!tracing::enabled!(target: "rdkafka", Level::DEBUG));
        });
    }
}
