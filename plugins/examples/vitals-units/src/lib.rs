//! vitals-units: converts device units in JSON vitals to the units the clinical systems use.
//!
//! Every member of the value object shaped `{"value": <number>, "unit": "<unit>"}` is
//! converted: `F`/`degF`/`[degF]` to `Cel`, `lb`/`[lb_av]` to `kg`, `in`/`[in_i]` to `cm`,
//! `oz`/`[oz_av]` to `g`. Other members are left alone. Setting (`transforms.<alias>.config.*`):
//! - `decimals`: digits kept after the point (default 1).
//!
//! A value that is not a JSON object fails the record.

use medconnect_guest::json::{self, Value};
use medconnect_guest::{export_transform, Config, Error, Record, Transform};

struct VitalsUnits {
    scale: f64,
}

fn convert(unit: &str, value: f64) -> Option<(&'static str, f64)> {
    match unit {
        "F" | "degF" | "[degF]" => Some(("Cel", (value - 32.0) * 5.0 / 9.0)),
        "lb" | "[lb_av]" => Some(("kg", value * 0.453_592_37)),
        "in" | "[in_i]" => Some(("cm", value * 2.54)),
        "oz" | "[oz_av]" => Some(("g", value * 28.349_523_125)),
        _ => None,
    }
}

impl VitalsUnits {
    fn convert_member(&self, member: &mut Value) {
        let unit = match member.get("unit").and_then(Value::as_str) {
            Some(unit) => unit.to_string(),
            None => return,
        };
        let value = match member.get("value").and_then(Value::as_f64) {
            Some(value) => value,
            None => return,
        };
        if let Some((to, converted)) = convert(&unit, value) {
            member.set("value", Value::number((converted * self.scale).round() / self.scale));
            member.set("unit", Value::String(to.to_string()));
        }
    }
}

impl Transform for VitalsUnits {
    fn configure(config: &Config) -> Result<Self, Error> {
        let decimals: i32 = match config.get("decimals") {
            None => 1,
            Some(text) => match text.trim().parse() {
                Ok(d) if (0..=6).contains(&d) => d,
                _ => return Err(Error::new("decimals must be a whole number from 0 to 6")),
            },
        };
        Ok(VitalsUnits { scale: 10f64.powi(decimals) })
    }

    fn transform(&mut self, mut record: Record) -> Result<Option<Record>, Error> {
        let text = record.value_str().ok_or_else(|| Error::new("the value is not UTF-8 text"))?;
        let mut value = json::parse(text).map_err(|e| Error::new(format!("the value is not JSON: {}", e)))?;
        match &mut value {
            Value::Object(members) => {
                for (_, member) in members.iter_mut() {
                    self.convert_member(member);
                }
            }
            _ => return Err(Error::new("the value is JSON but not an object")),
        }
        record.value = Some(value.to_json().into_bytes());
        Ok(Some(record))
    }
}

export_transform!(configured VitalsUnits);
