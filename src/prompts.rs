//! Reading prompt files for `score` and `calibrate`: JSONL with a `prompt` field or a
//! chat-style `messages` field (the last user turn, or the last few for `score_turns:
//! max`), or plain text, one prompt per line.

use std::path::Path;

use crate::error::Error;
use crate::request::user_texts;

/// Reads the prompts of `path`, in file order.
pub fn read(path: &Path) -> Result<Vec<String>, Error> {
    Ok(read_turns(path, 1)?.into_iter().flatten().collect())
}

/// Reads the entries of `path`, in file order, each as its last `turns` user turns (oldest
/// first; a `prompt` or a plain-text line is one turn).
pub fn read_turns(path: &Path, turns: usize) -> Result<Vec<Vec<String>>, Error> {
    let text = std::fs::read_to_string(path).map_err(|error| Error::io(path.display().to_string(), error))?;
    parse_turns(&text, turns).map_err(|error| Error::invalid(format!("{}: {error}", path.display())))
}

/// Parses prompt-file text into one prompt per entry (a chat entry's last user turn).
pub fn parse(text: &str) -> Result<Vec<String>, Error> {
    Ok(parse_turns(text, 1)?.into_iter().flatten().collect())
}

/// Parses prompt-file text into entries of up to `turns` user turns. The first non-empty
/// line decides the format: a JSON object means JSONL (every line must then be one),
/// anything else means plain text.
pub fn parse_turns(text: &str, turns: usize) -> Result<Vec<Vec<String>>, Error> {
    let is_jsonl = text
        .lines()
        .find(|line| !line.trim().is_empty())
        .is_some_and(|line| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line).is_ok());
    if !is_jsonl {
        return Ok(text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| vec![line.to_owned()])
            .collect());
    }
    let mut entries = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Value = serde_json::from_str(line)
            .map_err(|error| Error::invalid(format!("line {}: not JSON ({error})", number + 1)))?;
        let entry = match (row.get("prompt"), row.get("messages")) {
            (Some(serde_json::Value::String(prompt)), _) => vec![prompt.clone()],
            (_, Some(messages)) => user_texts(messages, turns)
                .ok_or_else(|| Error::invalid(format!("line {}: `messages` has no user message", number + 1)))?,
            _ => {
                return Err(Error::invalid(format!(
                    "line {}: expected a string `prompt` or a `messages` array",
                    number + 1
                )));
            }
        };
        entries.push(entry);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_prompts_and_messages() {
        let text = "{\"prompt\": \"one\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"two\"}], \"id\": 3}\n";
        assert_eq!(parse(text).unwrap(), vec!["one", "two"]);
        let chat = "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"user\", \"content\": \"b\"}]}\n{\"prompt\": \"c\"}\n";
        assert_eq!(parse(chat).unwrap(), vec!["b", "c"]);
        assert_eq!(parse_turns(chat, 8).unwrap(), vec![vec!["a", "b"], vec!["c"]]);
    }

    #[test]
    fn plain_text_one_per_line() {
        assert_eq!(
            parse("What is Rust?\n\nWrite a haiku\n").unwrap(),
            vec!["What is Rust?", "Write a haiku"]
        );
        // A line that merely starts with a brace is still text.
        assert_eq!(parse("{not json} explain\n").unwrap(), vec!["{not json} explain"]);
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let error = parse("{\"prompt\": \"a\"}\n{\"text\": \"b\"}\n").unwrap_err();
        assert!(error.to_string().contains("line 2"), "{error}");
        let error = parse("{\"prompt\": \"a\"}\nnot json\n").unwrap_err();
        assert!(error.to_string().contains("line 2"), "{error}");
    }
}
