//! FHIR instants (`2026-11-30T06:15:02.514857907+00:00`, `...02.514Z`) as nanoseconds since
//! the epoch, so versions sort by time whatever precision the server wrote them with.

/// Nanoseconds since 1970-01-01T00:00:00Z.
pub type Nanos = i128;

use medconnect_api::time::civil_from_days;

const NANOS_PER_SECOND: i128 = 1_000_000_000;

/// Days since the epoch of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn number(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Parses an RFC 3339 / FHIR `instant`; `None` for anything else.
pub fn parse(text: &str) -> Option<Nanos> {
    let text = text.trim();
    let (date, rest) = text.split_once(['T', 't'])?;
    let mut parts = date.splitn(3, '-');
    let year: i64 = number(parts.next()?)?.into();
    let month = number(parts.next()?)?;
    let day = number(parts.next()?)?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let (clock, offset_seconds) = if let Some(clock) = rest.strip_suffix(['Z', 'z']) {
        (clock, 0i64)
    } else {
        let split = rest.rfind(['+', '-'])?;
        let (clock, zone) = rest.split_at(split);
        let sign = if zone.starts_with('-') { -1 } else { 1 };
        let (hours, minutes) = zone[1..].split_once(':')?;
        let seconds = i64::from(number(hours)?) * 3600 + i64::from(number(minutes)?) * 60;
        (clock, sign * seconds)
    };
    let (whole, fraction) = match clock.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (clock, None),
    };
    let mut hms = whole.splitn(3, ':');
    let hours = number(hms.next()?)?;
    let minutes = number(hms.next()?)?;
    let seconds = number(hms.next()?)?;
    if hours > 23 || minutes > 59 || seconds > 60 {
        return None;
    }
    let nanos = match fraction {
        Some(fraction) => {
            let digits: String = fraction.chars().take(9).collect();
            let value = number(&digits)?;
            i128::from(value) * 10i128.pow(9 - digits.len() as u32)
        }
        None => 0,
    };
    let seconds = days_from_civil(year, month, day) * 86_400
        + i64::from(hours) * 3600
        + i64::from(minutes) * 60
        + i64::from(seconds)
        - offset_seconds;
    Some(i128::from(seconds) * NANOS_PER_SECOND + nanos)
}

/// Formats as UTC with nanoseconds (`2026-11-30T06:15:02.514857907Z`).
pub fn format(nanos: Nanos) -> String {
    let seconds = nanos.div_euclid(NANOS_PER_SECOND);
    let fraction = nanos.rem_euclid(NANOS_PER_SECOND);
    let days = seconds.div_euclid(86_400) as i64;
    let of_day = seconds.rem_euclid(86_400) as i64;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{fraction:09}Z",
        of_day / 3600,
        (of_day / 60) % 60,
        of_day % 60
    )
}

/// Milliseconds since the epoch (a Kafka timestamp).
pub fn millis(nanos: Nanos) -> i64 {
    i64::try_from(nanos.div_euclid(1_000_000)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_of_any_precision_compare_and_round_trip() {
        let coarse = parse("2026-11-30T06:15:02.514Z").expect("ms");
        let fine = parse("2026-11-30T06:15:02.514857907+00:00").expect("ns");
        assert!(coarse < fine);
        assert_eq!(fine - coarse, 857_907);
        assert_eq!(format(fine), "2026-11-30T06:15:02.514857907Z");
        assert_eq!(parse(&format(fine)), Some(fine));
        assert_eq!(
            parse("2026-11-30T08:15:02+02:00"),
            parse("2026-11-30T06:15:02Z")
        );
        assert_eq!(parse("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(millis(parse("1970-01-01T00:00:01.5Z").expect("t")), 1500);
        assert_eq!(
            format(parse("2024-02-29T23:59:59.000000001Z").expect("leap")),
            "2024-02-29T23:59:59.000000001Z"
        );
        for bad in [
            "",
            "2026-11-30",
            "2026-13-01T00:00:00Z",
            "x026-11-30T00:00:00Z",
            "2026-11-30T06:15:02",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
