//! Which topic filters a device may subscribe to (`mqtt.subscribe.allowed`), and which topics a
//! filter matches. An allowed filter may name the device — `${client.id}`, `${username}`,
//! `${cert.cn}` — so that each device subscribes to its own commands only.

use super::record::Device;

const VARIABLES: [&str; 3] = ["${client.id}", "${username}", "${cert.cn}"];

/// The allowed filters, as configured (identity variables not yet filled in).
#[derive(Debug, Clone, Default)]
pub struct AllowedFilters(Vec<String>);

impl AllowedFilters {
    pub fn parse(filters: &[String]) -> Result<Self, String> {
        let mut allowed = Vec::new();
        for filter in filters.iter().map(|f| f.trim()).filter(|f| !f.is_empty()) {
            let mut probe = filter.to_string();
            for variable in VARIABLES {
                probe = probe.replace(variable, "x");
            }
            if probe.contains("${") {
                return Err(format!(
                    "'{filter}': the variables are ${{client.id}}, ${{username}} and ${{cert.cn}}"
                ));
            }
            if !valid_filter(&probe) || probe.starts_with('$') {
                return Err(format!("'{filter}' is not an MQTT topic filter"));
            }
            allowed.push(filter.to_string());
        }
        Ok(Self(allowed))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `device` may subscribe to `requested`: every topic it matches must be matched
    /// by one allowed filter with the device's identity filled in. An identity that is
    /// missing, or holds `/`, `+` or `#` (it would widen the filter), allows nothing.
    pub fn permits(&self, requested: &str, device: &Device) -> bool {
        if !valid_filter(requested) || requested.starts_with('$') {
            return false;
        }
        self.0.iter().any(|template| {
            fill(template, device).is_some_and(|allowed| within(requested, &allowed))
        })
    }
}

fn fill(template: &str, device: &Device) -> Option<String> {
    let mut filter = template.to_string();
    let values = [
        Some(device.client_id.as_str()),
        device.username.as_deref(),
        device.certificate_cn.as_deref(),
    ];
    for (variable, value) in VARIABLES.iter().zip(values) {
        if filter.contains(variable) {
            let value = value.filter(|v| !v.is_empty() && !v.contains(['/', '+', '#', '\0']))?;
            filter = filter.replace(variable, value);
        }
    }
    Some(filter)
}

/// A filter as MQTT defines it: `+` and `#` fill whole levels, `#` only last.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels
        .iter()
        .enumerate()
        .all(|(index, level)| match *level {
            "#" => index + 1 == levels.len(),
            "+" => true,
            level => !level.contains(['+', '#']),
        })
}

/// Whether every topic `requested` matches is matched by `allowed` (both valid filters).
pub fn within(requested: &str, allowed: &str) -> bool {
    let mut requested = requested.split('/');
    for allowed_level in allowed.split('/') {
        if allowed_level == "#" {
            return true;
        }
        match requested.next() {
            None => return false,
            // `#` asks for more than one level can hold.
            Some("#") => return false,
            Some("+") if allowed_level != "+" => return false,
            Some(level) if allowed_level != "+" && level != allowed_level => return false,
            Some(_) => {}
        }
    }
    requested.next().is_none()
}

/// Whether topic name `topic` matches `filter` (topics starting with `$` match no wildcard at
/// their first level, as MQTT says).
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for (index, part) in filter.split('/').enumerate() {
        if part == "#" {
            return !(index == 0 && topic.starts_with('$'));
        }
        match levels.next() {
            None => return false,
            Some(level) if part == "+" => {
                if index == 0 && level.starts_with('$') {
                    return false;
                }
            }
            Some(level) if level != part => return false,
            Some(_) => {}
        }
    }
    levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(client_id: &str, username: Option<&str>) -> Device {
        Device {
            client_id: client_id.into(),
            username: username.map(Into::into),
            certificate_cn: None,
        }
    }

    #[test]
    fn a_device_subscribes_within_its_own_filters_only() {
        let allowed = AllowedFilters::parse(&[
            "devices/${client.id}/commands".into(),
            "wards/${username}/#".into(),
        ])
        .unwrap();
        let pump = device("pump-3", Some("ward-4"));
        assert!(allowed.permits("devices/pump-3/commands", &pump));
        assert!(!allowed.permits("devices/pump-4/commands", &pump));
        assert!(!allowed.permits("devices/+/commands", &pump));
        assert!(!allowed.permits("devices/#", &pump));
        assert!(!allowed.permits("#", &pump));
        assert!(allowed.permits("wards/ward-4/alarms", &pump));
        assert!(allowed.permits("wards/ward-4/#", &pump));
        assert!(allowed.permits("wards/ward-4/+/x", &pump));
        assert!(!allowed.permits("wards/ward-5/alarms", &pump));
        assert!(!allowed.permits("wards/+/alarms", &pump));
        // An identity with a wildcard or a level separator would widen the filter.
        assert!(!allowed.permits("devices/+/commands", &device("+", None)));
        assert!(!allowed.permits("devices/a/b/commands", &device("a/b", None)));
        // No username: the filter naming it allows nothing.
        assert!(!allowed.permits("wards/x/alarms", &device("pump-3", None)));
        assert!(AllowedFilters::parse(&["devices/${nope}".into()]).is_err());
        assert!(AllowedFilters::parse(&["a/#/b".into()]).is_err());
        assert!(AllowedFilters::parse(&[]).unwrap().is_empty());
    }

    #[test]
    fn filters_match_topics() {
        assert!(matches("devices/+/commands", "devices/pump-3/commands"));
        assert!(!matches("devices/+/commands", "devices/pump-3/alarms"));
        assert!(matches("devices/#", "devices/pump-3/commands"));
        assert!(matches("devices/#", "devices"));
        assert!(!matches("#", "$SYS/x"));
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(within("a/+/c", "a/#"));
        assert!(within("a/#", "a/#"));
        assert!(!within("a/#", "a/+"));
        assert!(!within("a", "a/b"));
        assert!(within("a/b", "+/+"));
    }
}
