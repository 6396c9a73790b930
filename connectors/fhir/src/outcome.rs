//! OperationOutcome: what the server says about a refused request. Its diagnostics may quote
//! patient data, so they travel only as an error's peer text (a dead-letter header, with the
//! connector's consent), never in error messages (task status traces, logs).

use serde_json::Value;

/// The issue that matters most in an OperationOutcome (the first `fatal`/`error` one, else the
/// first one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub severity: String,
    pub code: String,
    /// `diagnostics`, else `details.text`: may quote the resource. Not in `Display`.
    pub diagnostics: String,
}

impl Outcome {
    pub fn parse(value: &Value) -> Option<Self> {
        if value.get("resourceType")?.as_str()? != "OperationOutcome" {
            return None;
        }
        let issues = value.get("issue")?.as_array()?;
        let issue = issues
            .iter()
            .find(|i| matches!(i["severity"].as_str(), Some("fatal" | "error")))
            .or_else(|| issues.first())?;
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let diagnostics = match issue["diagnostics"].as_str() {
            Some(diagnostics) => diagnostics.to_string(),
            None => text(&issue["details"]["text"]),
        };
        Some(Self {
            severity: text(&issue["severity"]),
            code: text(&issue["code"]),
            diagnostics,
        })
    }
}

/// Severity and code only: safe for logs and status traces.
impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OperationOutcome {}/{}", self.severity, self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_first_error_issue_is_taken_and_diagnostics_stay_out_of_display() {
        let outcome = Outcome::parse(&json!({"resourceType": "OperationOutcome", "issue": [
            {"severity": "warning", "code": "informational", "diagnostics": "w"},
            {"severity": "error", "code": "invalid", "details": {"text": "Patient John Doe is bad"}}
        ]}))
        .expect("an outcome");
        assert_eq!(outcome.severity, "error");
        assert_eq!(outcome.code, "invalid");
        assert_eq!(outcome.diagnostics, "Patient John Doe is bad");
        assert_eq!(outcome.to_string(), "OperationOutcome error/invalid");
        assert_eq!(Outcome::parse(&json!({"resourceType": "Patient"})), None);
    }
}
