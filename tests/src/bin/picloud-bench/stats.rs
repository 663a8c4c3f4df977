//! Statistics over runs: medians, per-run ratios, percentiles.

use serde_json::{json, Value};

#[derive(Clone, Debug)]
pub struct Stat {
    pub values: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// Per-run ratios: each run measures both sides one right after the other, so a ratio of the
/// same run cancels most of the machine's drift between runs. Targets on ratios are judged on
/// their median, the figure the table shows.
pub fn ratios(num: &[f64], den: &[f64]) -> Vec<f64> {
    num.iter().zip(den).map(|(a, b)| a / b).collect()
}

pub fn median_ratio(num: &[f64], den: &[f64]) -> f64 {
    stat(&ratios(num, den)).median
}

pub fn stat(values: &[f64]) -> Stat {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let n = v.len();
    let median = if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Stat {
        values: values.to_vec(),
        median,
        min: v.first().copied().unwrap_or(f64::NAN),
        max: v.last().copied().unwrap_or(f64::NAN),
    }
}

/// Nearest-rank percentile of unsorted samples.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

pub fn num(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 1000.0).round() / 1000.0)
    } else {
        Value::Null
    }
}

pub fn stat_json(v: &[f64]) -> Value {
    let s = stat(v);
    json!({"median": num(s.median), "min": num(s.min), "max": num(s.max)})
}
