//! Order statistics for bench figures: medians and quartiles over rounds, so that one round
//! the machine's other load slowed decides nothing.

pub fn median(values: Vec<f64>) -> f64 {
    quantile(values, 0.5)
}

/// The value a fraction `q` of the way through `values` sorted (the nearest one).
pub fn quantile(mut values: Vec<f64>, q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let at = ((values.len().saturating_sub(1)) as f64 * q).round() as usize;
    values.get(at).copied().unwrap_or(0.0)
}
