//! Which role each REST call needs, and which calls change something (and are audited).

use axum::http::Method;
use serde::{Deserialize, Serialize};

/// A caller's role; each includes what the one before it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads: status, connector configs (secrets hidden), plugins, metrics.
    Viewer,
    /// And: pause, resume, stop, restart (connectors and tasks).
    Operator,
    /// And: create, change and delete connectors, offsets, topics reset, `/admin/loggers`,
    /// config validation (it reaches the connector's peer with the given settings).
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Calls that need no credentials at all: liveness and readiness probes.
pub fn is_open(path: &str) -> bool {
    matches!(path, "/health" | "/health/ready")
}

/// The role a call needs. Anything not listed (including paths that do not exist, so that
/// a 404 tells an anonymous caller nothing) needs at least `viewer`.
pub fn required(method: &Method, path: &str) -> Role {
    if path == "/admin/loggers" || path.starts_with("/admin/") {
        return Role::Admin;
    }
    if path.starts_with("/connector-plugins/") && path.ends_with("/config/validate") {
        return if *method == Method::GET {
            Role::Viewer
        } else {
            Role::Admin
        };
    }
    if *method == Method::GET || *method == Method::HEAD {
        return Role::Viewer;
    }
    if let Some(rest) = path.strip_prefix("/connectors/") {
        // A connector name may hold '/', so the action is read from the end.
        let operation = ["/pause", "/resume", "/stop", "/restart"]
            .iter()
            .any(|suffix| rest.ends_with(suffix));
        if operation && !rest.ends_with("/topics/reset") {
            return Role::Operator;
        }
    }
    Role::Admin
}

/// What a call that changes something does, for the audit trail; `None` for reads (and
/// validation, which changes nothing).
pub fn change(method: &Method, path: &str) -> Option<&'static str> {
    if *method == Method::GET || *method == Method::HEAD || *method == Method::OPTIONS {
        return None;
    }
    if path.starts_with("/admin/loggers/") {
        return Some("set-logger-level");
    }
    if path == "/connectors" {
        return (*method == Method::POST).then_some("create");
    }
    let rest = path.strip_prefix("/connectors/")?;
    let action = if rest.ends_with("/topics/reset") {
        "reset-topics"
    } else if rest.ends_with("/offsets") {
        match *method {
            Method::PATCH => "alter-offsets",
            Method::DELETE => "reset-offsets",
            _ => "offsets",
        }
    } else if rest.ends_with("/config") {
        match *method {
            Method::PATCH => "patch-config",
            _ => "put-config",
        }
    } else if rest.ends_with("/pause") {
        "pause"
    } else if rest.ends_with("/resume") {
        "resume"
    } else if rest.ends_with("/stop") {
        "stop"
    } else if rest.contains("/tasks/") && rest.ends_with("/restart") {
        "restart-task"
    } else if rest.ends_with("/restart") {
        "restart"
    } else if *method == Method::DELETE {
        "delete"
    } else {
        "change"
    };
    Some(action)
}

/// The connector a path is about, if any (`/connectors/{name}/...`).
pub fn connector_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/connectors/")?;
    const SUFFIXES: [&str; 10] = [
        "/topics/reset",
        "/offsets",
        "/config",
        "/status",
        "/pause",
        "/resume",
        "/stop",
        "/restart",
        "/topics",
        "/tasks",
    ];
    // `/tasks/{n}/restart` and `/tasks/{n}/status` first: the name is what precedes `/tasks/`.
    if let Some((name, _)) = rest.rsplit_once("/tasks/") {
        return Some(name.to_string());
    }
    let name = SUFFIXES
        .iter()
        .find_map(|suffix| rest.strip_suffix(suffix))
        .unwrap_or(rest);
    (!name.is_empty()).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_class_of_call_needs_its_role() {
        assert_eq!(required(&Method::GET, "/connectors/a/status"), Role::Viewer);
        assert_eq!(required(&Method::GET, "/connectors/a/config"), Role::Viewer);
        assert_eq!(required(&Method::GET, "/metrics"), Role::Viewer);
        assert_eq!(
            required(&Method::PUT, "/connectors/a/pause"),
            Role::Operator
        );
        assert_eq!(required(&Method::PUT, "/connectors/a/stop"), Role::Operator);
        assert_eq!(
            required(&Method::POST, "/connectors/a/tasks/0/restart"),
            Role::Operator
        );
        assert_eq!(required(&Method::POST, "/connectors"), Role::Admin);
        assert_eq!(required(&Method::PUT, "/connectors/a/config"), Role::Admin);
        assert_eq!(required(&Method::DELETE, "/connectors/a"), Role::Admin);
        assert_eq!(
            required(&Method::PATCH, "/connectors/a/offsets"),
            Role::Admin
        );
        assert_eq!(
            required(&Method::DELETE, "/connectors/a/offsets"),
            Role::Admin
        );
        assert_eq!(
            required(&Method::PUT, "/connectors/a/topics/reset"),
            Role::Admin
        );
        assert_eq!(required(&Method::GET, "/admin/loggers"), Role::Admin);
        assert_eq!(required(&Method::PUT, "/admin/loggers/root"), Role::Admin);
        assert_eq!(
            required(&Method::PUT, "/connector-plugins/x/config/validate"),
            Role::Admin
        );
        // A connector named like an operation is still a deletion.
        assert_eq!(required(&Method::DELETE, "/connectors/pause"), Role::Admin);
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
    }

    #[test]
    fn changes_are_named_with_their_connector() {
        assert_eq!(change(&Method::POST, "/connectors"), Some("create"));
        assert_eq!(change(&Method::GET, "/connectors/a"), None);
        assert_eq!(change(&Method::DELETE, "/connectors/a"), Some("delete"));
        assert_eq!(
            change(&Method::POST, "/connectors/a/tasks/1/restart"),
            Some("restart-task")
        );
        assert_eq!(
            change(&Method::PUT, "/connector-plugins/x/config/validate"),
            None
        );
        assert_eq!(
            connector_of("/connectors/a/b/tasks/1/restart").as_deref(),
            Some("a/b")
        );
        assert_eq!(connector_of("/connectors/a/offsets").as_deref(), Some("a"));
        assert_eq!(connector_of("/connectors/a").as_deref(), Some("a"));
        assert_eq!(connector_of("/connectors"), None);
    }
}
