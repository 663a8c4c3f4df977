//! The result table: rows, formatting, the text and markdown tables.

use crate::config::Cfg;
use crate::environment::machine;
use crate::stats::{num, ratios, stat, Stat};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let abs = x.abs();
    if abs >= 1000.0 {
        let s = format!("{:.0}", x.abs());
        let mut out = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(ch);
        }
        if x < 0.0 {
            out.insert(0, '-');
        }
        out
    } else if abs >= 100.0 {
        format!("{x:.0}")
    } else if abs >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

pub fn fmt_stat(s: &Option<Stat>, unit: &str) -> String {
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    match s {
        None => "—".into(),
        Some(s) if s.values.len() == 1 => format!("{}{unit}", fmt_num(s.median)),
        Some(s) => format!(
            "{}{unit} ({}–{})",
            fmt_num(s.median),
            fmt_num(s.min),
            fmt_num(s.max)
        ),
    }
}

pub fn fmt_ratio(s: &Option<Stat>) -> String {
    match s {
        None => "—".into(),
        Some(s) if s.values.len() == 1 => format!("{:.2}×", s.median),
        Some(s) => format!("{:.2}× ({:.2}–{:.2})", s.median, s.min, s.max),
    }
}

#[derive(Clone, Debug)]
pub struct Row {
    pub id: String,
    pub measure: String,
    pub unit: String,
    pub picloud: Option<Stat>,
    pub baseline_label: String,
    pub baseline: Option<Stat>,
    pub baseline_unit: String,
    pub ratio: Option<Stat>,
    pub target: String,
    pub pass: Option<bool>,
    pub error: Option<String>,
}

impl Row {
    pub fn new(id: &str, measure: &str, unit: &str) -> Row {
        Row {
            id: id.into(),
            measure: measure.into(),
            unit: unit.into(),
            picloud: None,
            baseline_label: String::new(),
            baseline: None,
            baseline_unit: String::new(),
            ratio: None,
            target: "—".into(),
            pass: None,
            error: None,
        }
    }

    pub fn value(mut self, values: &[f64]) -> Row {
        self.picloud = Some(stat(values));
        self
    }

    pub fn baseline(mut self, label: &str, values: &[f64], unit: &str) -> Row {
        self.baseline_label = label.into();
        self.baseline = Some(stat(values));
        self.baseline_unit = unit.into();
        self
    }

    /// Per-run ratio picloud / baseline, so each ratio compares figures of the same run.
    pub fn ratio_of(mut self, num: &[f64], den: &[f64]) -> Row {
        self.ratio = Some(stat(&ratios(num, den)));
        self
    }

    pub fn target(mut self, text: &str, pass: bool) -> Row {
        self.target = text.into();
        self.pass = Some(pass);
        self
    }

    pub fn failed(id: &str, measure: &str, error: String) -> Row {
        let mut row = Row::new(id, measure, "");
        row.error = Some(error);
        row
    }

    pub fn result(&self) -> &'static str {
        if self.error.is_some() {
            return "ERROR";
        }
        match self.pass {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "",
        }
    }

    pub fn cells(&self) -> Vec<String> {
        let baseline = match &self.baseline {
            None => "—".into(),
            Some(_) => format!(
                "{}: {}",
                self.baseline_label,
                fmt_stat(&self.baseline, &self.baseline_unit)
            ),
        };
        let picloud = match &self.error {
            Some(e) => format!("ERROR: {}", e.chars().take(100).collect::<String>()),
            None => fmt_stat(&self.picloud, &self.unit),
        };
        vec![
            self.id.clone(),
            self.measure.clone(),
            picloud,
            baseline,
            fmt_ratio(&self.ratio),
            self.target.clone(),
            self.result().into(),
        ]
    }

    pub fn to_json(&self) -> Value {
        let s = |s: &Option<Stat>| match s {
            None => Value::Null,
            Some(s) => json!({"median": num(s.median), "min": num(s.min), "max": num(s.max),
                              "runs": s.values.iter().map(|v| num(*v)).collect::<Vec<_>>()}),
        };
        json!({
            "id": self.id, "measure": self.measure, "unit": self.unit,
            "picloud": s(&self.picloud),
            "baseline_label": self.baseline_label, "baseline": s(&self.baseline), "baseline_unit": self.baseline_unit,
            "ratio": s(&self.ratio), "target": self.target, "result": self.result(), "error": self.error,
        })
    }
}

pub const HEADERS: [&str; 7] = [
    "ID",
    "Measure",
    "picloud (median, min–max)",
    "baseline",
    "ratio",
    "target",
    "result",
];

pub fn text_table(rows: &[Row]) -> String {
    let cells: Vec<Vec<String>> = rows.iter().map(Row::cells).collect();
    let mut widths: Vec<usize> = HEADERS.iter().map(|h| h.chars().count()).collect();
    for r in &cells {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |r: &[String]| {
        let parts: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c}{}", " ".repeat(widths[i] - c.chars().count())))
            .collect();
        format!("| {} |", parts.join(" | "))
    };
    let sep = format!(
        "|{}|",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("|")
    );
    let mut out = vec![sep.clone(), line(&HEADERS.map(String::from)), sep.clone()];
    let mut last_group = String::new();
    for (row, r) in rows.iter().zip(&cells) {
        let group: String = row.id.chars().take(2).collect();
        if !last_group.is_empty() && group != last_group {
            out.push(sep.clone());
        }
        last_group = group;
        out.push(line(r));
    }
    out.push(sep);
    out.join("\n")
}

pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = vec![
        format!("| {} |", HEADERS.join(" | ")),
        format!(
            "|{}|",
            HEADERS.iter().map(|_| "---").collect::<Vec<_>>().join("|")
        ),
    ];
    for r in rows {
        let cells: Vec<String> = r.cells().iter().map(|c| c.replace('|', "\\|")).collect();
        out.push(format!("| {} |", cells.join(" | ")));
    }
    out.join("\n")
}

/// Writes results.json (figures, notes, chart data, run metadata) and results.md (the table
/// with the machine, the source and the settings) to BENCH_OUT; their paths.
pub fn write_results(
    cfg: &Cfg,
    started: SystemTime,
    source: Value,
    settings: Value,
    rows: &[Row],
    notes: &[String],
    chart: Value,
) -> std::io::Result<(PathBuf, PathBuf)> {
    let elapsed = started.elapsed().map(|d| d.as_secs()).unwrap_or(0);
    let meta = json!({
        "quick": cfg.quick, "runs": cfg.runs, "port": cfg.port, "database": cfg.db,
        "started_unix": started.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "duration_s": elapsed, "machine": machine(), "settings": settings, "source": source,
        "parameters": {
            "e1_secs": cfg.e1_secs, "e2_events": cfg.e2_events, "p1_events": cfg.p1_events,
            "p1_http_events": cfg.p1_http_events, "l1_samples": cfg.l1_samples, "m1_secs": cfg.m1_secs,
            "g1_rows": cfg.g1_rows, "b1_events": cfg.b1_events, "b1_wait_s": cfg.b1_wait.as_secs(),
            "l1_gap_ms": cfg.l1_gap_ms, "only": cfg.only,
        },
    });
    let doc = json!({
        "meta": meta,
        "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        "notes": notes,
        "chart": chart,
    });
    let json_path = cfg.out.join("results.json");
    let md_path = cfg.out.join("results.md");
    let mut md = String::new();
    md.push_str(&format!(
        "# picloud benchmark{}\n\n",
        if cfg.quick { " (quick run)" } else { "" }
    ));
    let m = &meta["machine"];
    md.push_str(&format!(
        "Machine: {} CPUs, {}, {} GiB RAM, load at start {}. Duration {} s.\n\n",
        m["nproc"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["memory_gib"],
        m["loadavg_at_start"].as_str().unwrap_or("?"),
        elapsed
    ));
    md.push_str(&format!(
        "Source: commit {} with {} modified tracked file(s) at start.\n\n",
        meta["source"]["commit"].as_str().unwrap_or("?"),
        meta["source"]["modified_files"]
    ));
    if let Value::Object(s) = &meta["settings"] {
        let list: Vec<String> = s
            .iter()
            .map(|(k, v)| format!("`{k}={}`", v.as_str().unwrap_or("")))
            .collect();
        md.push_str(&format!("Settings: {}\n\n", list.join(", ")));
    }
    md.push_str(&markdown_table(rows));
    md.push_str("\n\n");
    for n in notes {
        md.push_str(&format!("- {n}\n"));
    }
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&doc).unwrap_or_default(),
    )
    .and_then(|_| std::fs::write(&md_path, md))
    .map(|_| (md_path, json_path))
}
