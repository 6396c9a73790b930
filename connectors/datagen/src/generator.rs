//! Deterministic synthetic events: vital signs and ADT patient events.

use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use medconnect_api::ConnectError;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Schema {
    #[default]
    Vitals,
    Adt,
    Mixed,
}

impl Schema {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vitals => "vitals",
            Self::Adt => "adt",
            Self::Mixed => "mixed",
        }
    }
}

impl FromStr for Schema {
    type Err = ConnectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "vitals" => Ok(Self::Vitals),
            "adt" => Ok(Self::Adt),
            "mixed" => Ok(Self::Mixed),
            other => Err(ConnectError::config(
                "schema",
                format!("unknown schema '{other}'"),
            )),
        }
    }
}

/// One generated event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub key: String,
    pub value: Vec<u8>,
    pub kind: &'static str,
    pub timestamp_ms: i64,
}

const FAMILY: &[&str] = &[
    "Garcia", "Nguyen", "Smith", "Okafor", "Kowalski", "Haddad", "Tanaka", "Silva", "Murphy",
    "Novak",
];
const GIVEN: &[&str] = &[
    "Maria", "Wei", "John", "Amara", "Piotr", "Layla", "Yuki", "Joao", "Aoife", "Eva",
];
const UNITS: &[&str] = &["ICU", "CCU", "ED", "MED-4", "SURG-2", "PEDS"];
const ADT_EVENTS: &[(&str, &str)] = &[
    ("A01", "admit"),
    ("A02", "transfer"),
    ("A03", "discharge"),
    ("A08", "update"),
];
const PATIENTS: u64 = 500;

/// The event number `seq` of a task's stream: the same inputs always give the same event.
pub fn generate(schema: Schema, seed: u64, task: u32, seq: u64) -> Event {
    let mut rng = SmallRng::seed_from_u64(
        seed ^ (u64::from(task) << 48) ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let patient = rng.random_range(0..PATIENTS);
    let mrn = format!("MRN{patient:06}");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let vitals = match schema {
        Schema::Vitals => true,
        Schema::Adt => false,
        Schema::Mixed => !seq.is_multiple_of(10),
    };
    let value = if vitals {
        json!({
            "seq": seq,
            "task": task,
            "type": "vitals",
            "device_id": format!("monitor-{:03}", patient % 120),
            "patient_id": mrn,
            "observed_at": now,
            "heart_rate": rng.random_range(48..140),
            "spo2": rng.random_range(86..100),
            "resp_rate": rng.random_range(10..30),
            "temperature_c": (rng.random_range(355..401) as f64) / 10.0,
            "bp_systolic": rng.random_range(90..180),
            "bp_diastolic": rng.random_range(55..110),
        })
    } else {
        let (code, name) = ADT_EVENTS[rng.random_range(0..ADT_EVENTS.len())];
        json!({
            "seq": seq,
            "task": task,
            "type": "adt",
            "event": code,
            "event_name": name,
            "occurred_at": now,
            "patient": {
                "mrn": mrn,
                "family": FAMILY[(patient % FAMILY.len() as u64) as usize],
                "given": GIVEN[(patient / 7 % GIVEN.len() as u64) as usize],
                "birth_date": format!("{}-{:02}-{:02}", 1935 + patient % 85, 1 + patient % 12, 1 + patient % 28),
                "sex": if patient.is_multiple_of(2) { "F" } else { "M" },
            },
            "location": {
                "unit": UNITS[rng.random_range(0..UNITS.len())],
                "room": rng.random_range(100..499),
                "bed": if rng.random_bool(0.5) { "A" } else { "B" },
            },
        })
    };
    Event {
        key: mrn,
        value: value.to_string().into_bytes(),
        kind: if vitals { "vitals" } else { "adt" },
        timestamp_ms: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_position_gives_the_same_event() {
        let a = generate(Schema::Mixed, 7, 1, 1234);
        let b = generate(Schema::Mixed, 7, 1, 1234);
        assert_eq!(a.key, b.key);
        let strip = |e: &Event| {
            let mut v: serde_json::Value = serde_json::from_slice(&e.value).unwrap();
            v.as_object_mut().unwrap().remove("observed_at");
            v.as_object_mut().unwrap().remove("occurred_at");
            v
        };
        assert_eq!(strip(&a), strip(&b));
        assert_ne!(strip(&a), strip(&generate(Schema::Mixed, 7, 1, 1235)));
    }

    #[test]
    fn events_are_plausible_json() {
        let vitals: serde_json::Value =
            serde_json::from_slice(&generate(Schema::Vitals, 1, 0, 5).value).unwrap();
        assert_eq!(vitals["seq"], 5);
        assert!((86..100).contains(&vitals["spo2"].as_i64().unwrap()));
        let adt: serde_json::Value =
            serde_json::from_slice(&generate(Schema::Adt, 1, 0, 5).value).unwrap();
        assert!(adt["event"].as_str().unwrap().starts_with('A'));
        assert!(adt["patient"]["mrn"].as_str().unwrap().starts_with("MRN"));
    }
}
