//! The dashboard's HTML templates (minijinja, compiled into the binary). Every template
//! escapes every value for HTML: payloads and error texts are tenant data.

use axum::response::Html;
use minijinja::{AutoEscape, Environment};
use serde::Serialize;

use crate::error::ConsoleError;

pub struct Views {
    env: Environment<'static>,
}

const TEMPLATES: [(&str, &str); 12] = [
    ("base.html", include_str!("../templates/base.html")),
    ("login.html", include_str!("../templates/login.html")),
    ("apps.html", include_str!("../templates/apps.html")),
    ("app_nav.html", include_str!("../templates/app_nav.html")),
    (
        "dead_letters.html",
        include_str!("../templates/dead_letters.html"),
    ),
    (
        "dead_letter.html",
        include_str!("../templates/dead_letter.html"),
    ),
    ("confirm.html", include_str!("../templates/confirm.html")),
    ("bulk.html", include_str!("../templates/bulk.html")),
    ("outbox.html", include_str!("../templates/outbox.html")),
    ("triggers.html", include_str!("../templates/triggers.html")),
    ("stats.html", include_str!("../templates/stats.html")),
    ("error.html", include_str!("../templates/error.html")),
];

/// "2026-12-05T07:51:17.123456Z" as "2026-12-05 07:51:17 UTC"; anything else unchanged.
fn when(value: Option<String>) -> String {
    let Some(text) = value else {
        return "—".into();
    };
    match chrono::DateTime::parse_from_rfc3339(&text) {
        Ok(t) => t
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%d %H:%M:%S UTC")
            .to_string(),
        Err(_) => text,
    }
}

impl Views {
    pub fn new() -> Result<Views, String> {
        let mut env = Environment::new();
        env.set_auto_escape_callback(|_| AutoEscape::Html);
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
        env.add_filter("when", when);
        for (name, source) in TEMPLATES {
            env.add_template(name, source)
                .map_err(|e| format!("template {name}: {e}"))?;
        }
        Ok(Views { env })
    }

    pub fn render(
        &self,
        name: &str,
        context: impl Serialize,
    ) -> Result<Html<String>, ConsoleError> {
        let template = self.env.get_template(name).map_err(render_error)?;
        template.render(context).map(Html).map_err(render_error)
    }
}

fn render_error(e: minijinja::Error) -> ConsoleError {
    tracing::error!(error = %e, "a page failed to render");
    ConsoleError::console(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "render_failed",
        "the page failed to render",
    )
}
