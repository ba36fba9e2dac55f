//! Names that configurations written for earlier Spooky versions use: log levels with
//! seasonal names, and keys that have since been renamed. None of them is accepted silently
//! (a seasonal level would be read as a tracing *target*: `silence` would log almost
//! nothing, `spooky` everything); each is refused with the name to write instead.

/// Seasonal log levels of earlier versions and the level each stood for.
const LEVELS: [(&str, &str); 6] = [
    ("silence", "off"),
    ("scream", "error"),
    ("haunt", "warn"),
    ("spooky", "info"),
    ("whisper", "debug"),
    ("poltergeist", "trace"),
];

/// Keys of earlier versions: (old name, where it was, what to write now). "Where" is a part
/// of the field path that must contain the key, empty for anywhere, `TOP` for the top level.
const KEYS: [(&str, &str, &str); 7] = [
    (
        "timeout_ms",
        "",
        "`timeout` (a duration, e.g. `timeout: 1500ms`)",
    ),
    (
        "interval_ms",
        "",
        "`interval` (a duration, e.g. `interval: 5s`)",
    ),
    (
        "cooldown_ms",
        "",
        "`cooldown` (a duration, e.g. `cooldown: 30s`)",
    ),
    (
        "failure_threshold",
        "passive_health",
        "`consecutive_failures`",
    ),
    ("failure_threshold", "", "`unhealthy_threshold`"),
    ("success_threshold", "", "`healthy_threshold`"),
    (
        "backends",
        TOP,
        "`upstream: {NAME: {backends: [...]}}` (backends belong to a pool)",
    ),
];

/// The `where` of a key that sat at the top level of the file.
const TOP: &str = "(top level)";

/// What is wrong with a `log.level` directive list, when a part of it is a seasonal level of
/// an earlier version or a bare word that is not a level (tracing would read it as a target
/// and log nothing of Spooky's).
pub(super) fn log_level_problem(filter: &str) -> Option<String> {
    for part in filter.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let word = part.to_ascii_lowercase();
        if let Some((_, level)) = LEVELS.iter().find(|(old, _)| *old == word) {
            return Some(format!(
                "`{part}` is a log level name of earlier Spooky versions: write `{level}`"
            ));
        }
        let is_level = ["off", "error", "warn", "info", "debug", "trace"].contains(&word.as_str());
        if !part.contains('=') && !is_level && !part.contains('[') {
            return Some(format!(
                "`{part}` is neither a level (off, error, warn, info, debug, trace) nor \
                 `target=level` (e.g. `spooky=debug,info`)"
            ));
        }
    }
    None
}

/// The serde error of an unknown key, turned into (path, message) naming its replacement when
/// the key is one of an earlier version.
pub(super) fn renamed_key(err: &serde_yaml::Error) -> Option<(String, String)> {
    let text = err.to_string();
    let (parent, rest) = match text.split_once(": unknown field `") {
        Some((parent, rest)) => (Some(parent), rest),
        None => (None, text.strip_prefix("unknown field `")?),
    };
    let key = rest.split('`').next()?;
    let (_, _, now) = KEYS.iter().find(|(old, within, _)| {
        *old == key
            && match parent {
                None => within.is_empty() || *within == TOP,
                Some(parent) => within.is_empty() || parent.contains(within),
            }
    })?;
    let path = parent.map_or_else(|| key.to_owned(), |parent| format!("{parent}.{key}"));
    // A path through a multi-line YAML key stays on one line.
    let path = path.escape_debug().to_string();
    Some((
        path,
        format!("`{key}` is a key of earlier Spooky versions: write {now}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seasonal_levels_and_bare_words_are_refused_with_the_replacement() {
        for (old, new) in LEVELS {
            let problem = log_level_problem(old).unwrap_or_default();
            assert!(
                problem.contains(&format!("write `{new}`")),
                "{old}: {problem}"
            );
        }
        assert!(log_level_problem("info,Whisper").is_some_and(|p| p.contains("`debug`")));
        assert!(log_level_problem("verbose").is_some_and(|p| p.contains("neither a level")));
        for fine in [
            "info",
            "WARN",
            "spooky=debug,info",
            "h2=off,quiche=trace",
            "off",
        ] {
            assert_eq!(log_level_problem(fine), None, "{fine}");
        }
    }
}
