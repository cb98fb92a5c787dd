//! Reading prompt files for `score`, `calibrate` and `label`: JSONL with a `prompt` field or
//! a chat-style `messages` field (the last user turn, or the last few for `score_turns:
//! max`; for `label`, also the conversation it ended), or plain text, one prompt per line.

use std::path::Path;

use crate::error::Error;
use serde_json::Value;

use crate::request::user_texts;

/// Reads the prompts of `path`, in file order.
pub fn read(path: &Path) -> Result<Vec<String>, Error> {
    Ok(read_turns(path, 1)?.into_iter().flatten().collect())
}

/// Reads the entries of `path`, in file order, each as its last `turns` user turns (oldest
/// first; a `prompt` or a plain-text line is one turn).
pub fn read_turns(path: &Path, turns: usize) -> Result<Vec<Vec<String>>, Error> {
    read_with(path, |text| parse_turns(text, turns))
}

/// `parse` of the text of `path`, its errors naming the file.
fn read_with<T>(path: &Path, parse: impl FnOnce(&str) -> Result<T, Error>) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(|error| Error::io(path.display().to_string(), error))?;
    parse(&text).map_err(|error| Error::invalid(format!("{}: {error}", path.display())))
}

/// Parses prompt-file text into one prompt per entry (a chat entry's last user turn).
pub fn parse(text: &str) -> Result<Vec<String>, Error> {
    Ok(parse_turns(text, 1)?.into_iter().flatten().collect())
}

/// Parses prompt-file text into entries of up to `turns` user turns. The first non-empty
/// line decides the format: a JSON object means JSONL (every line must then be one),
/// anything else means plain text.
pub fn parse_turns(text: &str, turns: usize) -> Result<Vec<Vec<String>>, Error> {
    rows(text, |row, number| turns_of(row, number, turns))
}

/// An entry's last `turns` user turns: its `prompt`, or the user messages of `messages`.
fn turns_of(row: &Value, number: usize, turns: usize) -> Result<Vec<String>, Error> {
    match (row.get("prompt"), row.get("messages")) {
        (Some(Value::String(prompt)), _) => Ok(vec![prompt.clone()]),
        (_, Some(messages)) => user_texts(messages, turns)
            .ok_or_else(|| Error::invalid(format!("line {number}: `messages` has no user message"))),
        _ => Err(Error::invalid(format!(
            "line {number}: expected a string `prompt` or a `messages` array"
        ))),
    }
}

/// A prompt, as [`parse`] reads it, with the conversation it ends when the entry has one.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub prompt: String,
    /// The messages up to and including the last user message: a `conversation` field (the
    /// prompt log's, with `conversations: true`), or a `messages` array holding more than
    /// user turns (a system prompt, answers). `None` for a prompt on its own.
    pub conversation: Option<Vec<Value>>,
}

impl From<String> for Entry {
    /// A prompt asked on its own.
    fn from(prompt: String) -> Self {
        Self {
            prompt,
            conversation: None,
        }
    }
}

impl AsRef<str> for Entry {
    fn as_ref(&self) -> &str {
        &self.prompt
    }
}

/// Reads the entries of `path` with their conversations, in file order (for `label`).
pub fn read_entries(path: &Path) -> Result<Vec<Entry>, Error> {
    read_with(path, parse_entries)
}

/// Parses prompt-file text into [`Entry`]s.
pub fn parse_entries(text: &str) -> Result<Vec<Entry>, Error> {
    rows(text, |row, number| {
        let prompt = turns_of(row, number, 1)?.pop().unwrap_or_default();
        let found = match (row.get("conversation"), row.get("messages")) {
            (Some(conversation), _) => Some(conversation),
            (None, Some(messages)) if has_other_roles(messages) => Some(messages),
            _ => None,
        };
        let conversation = found
            .map(|messages| up_to_last_user_turn(messages, number))
            .transpose()?;
        Ok(Entry { prompt, conversation })
    })
}

fn has_other_roles(messages: &Value) -> bool {
    messages.as_array().is_some_and(|messages| {
        messages
            .iter()
            .any(|message| message.get("role").and_then(Value::as_str) != Some("user"))
    })
}

/// The messages of a conversation up to its last user message (a log may hold the answer
/// that followed); an error names `number`'s line when it is not an array of objects with
/// a `role`, or has no user message.
fn up_to_last_user_turn(messages: &Value, number: usize) -> Result<Vec<Value>, Error> {
    let malformed = || {
        Error::invalid(format!(
            "line {number}: a conversation is an array of messages, each an object with a string `role`"
        ))
    };
    let messages = messages.as_array().ok_or_else(malformed)?;
    if messages
        .iter()
        .any(|message| message.get("role").and_then(Value::as_str).is_none())
    {
        return Err(malformed());
    }
    let last_user = messages
        .iter()
        .rposition(|message| message.get("role").and_then(Value::as_str) == Some("user"))
        .ok_or_else(|| Error::invalid(format!("line {number}: the conversation has no user message")))?;
    Ok(messages[..=last_user].to_vec())
}

/// Each entry of prompt-file text through `entry` (a JSON line and its 1-based number); a
/// plain-text file gives each non-empty line as `{"prompt": line}`.
fn rows<T>(text: &str, mut entry: impl FnMut(&Value, usize) -> Result<T, Error>) -> Result<Vec<T>, Error> {
    let is_jsonl = text
        .lines()
        .find(|line| !line.trim().is_empty())
        .is_some_and(|line| serde_json::from_str::<serde_json::Map<String, Value>>(line).is_ok());
    let mut entries = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row = if is_jsonl {
            serde_json::from_str(line)
                .map_err(|error| Error::invalid(format!("line {}: not JSON ({error})", index + 1)))?
        } else {
            serde_json::json!({"prompt": line})
        };
        entries.push(entry(&row, index + 1)?);
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
    fn entries_carry_the_conversation_a_prompt_ended() {
        let system = r#"{"role": "system", "content": "Be brief."}"#;
        let text = format!(
            "{{\"prompt\": \"lone\"}}\n\
             {{\"messages\": [{{\"role\": \"user\", \"content\": \"a\"}}, {{\"role\": \"user\", \"content\": \"b\"}}]}}\n\
             {{\"messages\": [{system}, {{\"role\": \"user\", \"content\": \"c\"}}, {{\"role\": \"assistant\", \"content\": \"after\"}}]}}\n\
             {{\"messages\": [{{\"role\": \"user\", \"content\": \"d\"}}], \"conversation\": [{system}, {{\"role\": \"user\", \"content\": \"d\"}}]}}\n"
        );
        let entries = parse_entries(&text).unwrap();
        let prompts: Vec<&str> = entries.iter().map(|entry| entry.prompt.as_str()).collect();
        assert_eq!(prompts, ["lone", "b", "c", "d"]);
        // User turns alone are prompts, as the prompt log writes them without conversations.
        assert_eq!(
            (entries[0].conversation.as_ref(), entries[1].conversation.as_ref()),
            (None, None)
        );
        // Up to the last user turn: an answer logged after it is not part of the request.
        let roles = |entry: &Entry| -> Vec<String> {
            (entry.conversation.iter().flatten())
                .map(|message| message["role"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(roles(&entries[2]), ["system", "user"]);
        assert_eq!(roles(&entries[3]), ["system", "user"]);
        assert_eq!(
            parse_entries("plain line\n").unwrap(),
            [Entry::from("plain line".to_owned())]
        );
        for (bad, why) in [
            (
                r#"{"prompt": "x", "conversation": "not messages"}"#,
                "array of messages",
            ),
            (
                r#"{"prompt": "x", "conversation": [{"content": "no role"}]}"#,
                "array of messages",
            ),
            (
                r#"{"prompt": "x", "conversation": [{"role": "system", "content": "s"}]}"#,
                "no user message",
            ),
        ] {
            let error = parse_entries(&format!("{{\"prompt\": \"ok\"}}\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(error.contains("line 2") && error.contains(why), "{error}");
        }
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let error = parse("{\"prompt\": \"a\"}\n{\"text\": \"b\"}\n").unwrap_err();
        assert!(error.to_string().contains("line 2"), "{error}");
        let error = parse("{\"prompt\": \"a\"}\nnot json\n").unwrap_err();
        assert!(error.to_string().contains("line 2"), "{error}");
    }
}
