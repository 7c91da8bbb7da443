//! The one place YAML is read and written (templates, manifests, `render`), so every reader
//! agrees on what a scalar means. The schema is YAML 1.2 core, as it was with `serde_yaml` 0.9,
//! with the choices below; README "Template format" has the table and tests/yaml_golden.rs pins it.
//!
//! - Booleans are only `true`/`false` (any case): `yes`, `on`, `y` stay strings. A value such as
//!   `value: yes` in an env var is then the string the author meant, not a boolean.
//! - A leading zero is octal, as `kubectl` reads a manifest: `defaultMode: 0755` is 493 (YAML 1.2
//!   would read 755, an invalid mode).
//! - A duplicate mapping key is an error naming its line (serde_yaml kept the last one silently).
//! - `.inf`/`.nan` are errors (serde_yaml turned them into `null`, losing them silently).

use serde::de::DeserializeOwned;
use serde::Serialize;
pub use serde_saphyr::Spanned;

/// A YAML text that does not parse or does not fit the type asked for; the message ends with the
/// line and column (`... at line 3, column 2`), counted in the text that was parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct YamlError {
    pub message: String,
    /// 1-based line of the error in the parsed text, when known.
    pub line: Option<u64>,
}

impl From<serde_saphyr::Error> for YamlError {
    fn from(e: serde_saphyr::Error) -> Self {
        // Hints meant for the Rust programmer, not for whoever wrote the template.
        let message = e
            .to_string()
            .replace(", set DuplicateKeyPolicy in Options if acceptable", "")
            .replace("; use Option<String>", "");
        YamlError { line: e.location().map(|l| l.line()), message }
    }
}

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        legacy_octal_numbers: true,
        // One-line messages: they end up in denials, Events, logs and `validate` output.
        with_snippet: false,
    }
}

/// One YAML (or JSON) document. A value of the wrong shape is named by its path
/// (`labels: expected mapping start at line 1, column 9`).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    let mut path = String::new();
    let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, options(), |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            // `?` stands for a segment serde could not name (a syntax error inside a map).
            path = e.path().to_string().trim_end_matches(".?").trim_start_matches('?').to_owned();
            e.into_inner()
        })
    });
    parsed.map_err(|e| {
        let mut error = YamlError::from(e);
        let named = error.message.starts_with(&format!("unknown field `{path}`"));
        if !path.is_empty() && path != "." && !path.contains('?') && !named {
            error.message = format!("{path}: {}", error.message);
        }
        error
    })
}

/// Every non-empty document of a `---`-separated stream, in order.
pub fn documents<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, YamlError> {
    Ok(serde_saphyr::from_multiple_with_options(text, options())?)
}

/// Block-style YAML; strings a YAML 1.1 reader would take for something else (`"yes"`, `"0755"`)
/// are quoted, so `kubectl` reads back the same values.
/// Long one-line values (the applied annotation) stay on one line, not folded (`>-`).
pub fn to_string<T: Serialize>(value: &T) -> Result<String, YamlError> {
    let mut options = serde_saphyr::SerializerOptions::default();
    options.folded_wrap_chars = usize::MAX;
    serde_saphyr::to_string_with_options(value, options).map_err(|e| YamlError { message: e.to_string(), line: None })
}
