//! A request body (Chat Completions, Responses or legacy Completions) read just far enough
//! to route it, and
//! rewritten by replacing `model` alone.
//!
//! The body is kept as its top-level fields' raw JSON text, in order. Everything the
//! proxy does not own (`tools`, `response_format` with a JSON schema, vendor extensions,
//! the exact spelling of numbers) reaches the upstream byte for byte, and nothing is
//! injected: this is what RouteLLM's typed request model could not guarantee.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::Error;

/// OpenAI's wording for a body that is not JSON, so clients see a familiar message.
const UNPARSABLE_BODY: &str = "We could not parse the JSON body of your request. (HINT: This likely means you \
aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)";

/// The OpenAI APIs the proxy routes; they differ in where the prompt is and in the shape
/// of answers and stream events, not in how a request is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/chat/completions`: the prompt is the last user message in `messages`.
    ChatCompletions,
    /// `POST /v1/responses`: the prompt is `input` when it is a string, else its last
    /// item with role `user`.
    Responses,
    /// `POST /v1/completions` (legacy): the prompt is `prompt` when it is a string; an
    /// array of strings (a batch, all answered by one model) is scored like a
    /// conversation's user turns.
    Completions,
}

impl Api {
    /// The endpoint's path below a provider's base URL.
    #[must_use]
    pub fn path(self) -> &'static str {
        match self {
            Api::ChatCompletions => "chat/completions",
            Api::Responses => "responses",
            Api::Completions => "completions",
        }
    }

    /// The request field holding the conversation.
    #[must_use]
    pub fn prompt_field(self) -> &'static str {
        match self {
            Api::ChatCompletions => "messages",
            Api::Responses => "input",
            Api::Completions => "prompt",
        }
    }
}

/// A parsed request body that borrows from the bytes it was read from.
#[derive(Debug)]
pub struct ModelRequest<'a> {
    api: Api,
    fields: Vec<(Cow<'a, str>, &'a RawValue)>,
    model: Cow<'a, str>,
    stream: bool,
    /// The conversation's messages with their positions in it (Responses input items
    /// without a role, such as tool outputs, are left out).
    messages: Vec<(usize, Message<'a>)>,
}

impl<'a> ModelRequest<'a> {
    /// Reads the top level of `body`, a request to `api`, and checks the fields the proxy relies on.
    pub fn parse(api: Api, body: &'a [u8]) -> Result<Self, Error> {
        let fields = serde_json::from_slice::<TopLevel<'a>>(body)
            .map_err(|error| {
                if error.is_data() {
                    Error::invalid("Invalid body: the request body must be a JSON object.")
                } else {
                    Error::invalid(UNPARSABLE_BODY)
                }
            })?
            .0;
        let raw_model = last_field(&fields, "model").ok_or_else(|| Error::InvalidRequest {
            message: "you must provide a model parameter".into(),
            param: None,
            code: None,
        })?;
        let model = Cow::<str>::deserialize(raw_model).map_err(|_| {
            Error::invalid_param(
                format!(
                    "Invalid type for 'model': expected a string, but got {} instead.",
                    json_type_name(raw_model)
                ),
                "model",
            )
        })?;
        let stream = match last_field(&fields, "stream") {
            None => false,
            Some(raw) => Option::<bool>::deserialize(raw)
                .map_err(|_| {
                    Error::invalid_param(
                        format!(
                            "Invalid type for 'stream': expected a boolean, but got {} instead.",
                            json_type_name(raw)
                        ),
                        "stream",
                    )
                })?
                .unwrap_or(false),
        };
        let messages = match api {
            Api::ChatCompletions => parse_messages(last_field(&fields, "messages"))?,
            Api::Responses => parse_input(last_field(&fields, "input"))?,
            Api::Completions => parse_prompt(last_field(&fields, "prompt"))?,
        };
        Ok(Self {
            api,
            fields,
            model,
            stream,
            messages,
        })
    }

    /// Every top-level field as sent: its name and its value's JSON text, in the body's order.
    pub fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        self.fields.iter().map(|(name, value)| (name.as_ref(), value.get()))
    }

    /// A top-level field's JSON as sent (the last, if the body repeats it).
    #[must_use]
    pub fn raw_field(&self, name: &str) -> Option<&'a RawValue> {
        last_field(&self.fields, name)
    }

    /// The `model` the client asked for.
    #[must_use]
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The answer a Responses request continues (`previous_response_id`), if it names one.
    #[must_use]
    pub fn previous_response_id(&self) -> Option<&'a str> {
        if self.api != Api::Responses {
            return None;
        }
        // A borrowed string is enough: ids have nothing to unescape.
        last_field(&self.fields, "previous_response_id").and_then(|raw| <&str>::deserialize(raw).ok())
    }

    /// Whether the client asked for a server-sent-event stream.
    #[must_use]
    pub fn stream(&self) -> bool {
        self.stream
    }

    /// The API the request is for.
    #[must_use]
    pub fn api(&self) -> Api {
        self.api
    }

    /// The text a router scores: the last user message, its text parts joined by newlines
    /// (images and other non-text parts carry no text to score).
    pub fn last_user_prompt(&self) -> Result<String, Error> {
        let mut prompts = self.user_prompts(1)?;
        Ok(prompts.pop().unwrap_or_default())
    }

    /// The texts of the last `limit` user messages (at least one), oldest first, each as
    /// [`ModelRequest::last_user_prompt`] reads it.
    pub fn user_prompts(&self, limit: usize) -> Result<Vec<String>, Error> {
        let field = self.api.prompt_field();
        let mut user_messages = self
            .messages
            .iter()
            .filter(|(_, message)| message.role == "user")
            .rev()
            .take(limit.max(1))
            .peekable();
        if user_messages.peek().is_none() {
            let message = if self.api == Api::Completions {
                // parse_prompt keeps no text only for prompts given as token ids.
                "Invalid 'prompt': routing needs the prompt as text (a string or an array of strings); \
                 a prompt of token ids can only be sent to a model named directly."
                    .to_owned()
            } else {
                format!("Invalid '{field}': routing needs at least one message with role 'user'.")
            };
            return Err(Error::InvalidRequest {
                message,
                param: Some(field),
                code: None,
            });
        }
        let mut prompts = user_messages
            .map(|(index, message)| {
                let Some(raw) = message.content else {
                    return Ok(String::new());
                };
                let content = Content::deserialize(raw).map_err(|_| Error::InvalidRequest {
                    message: format!(
                        "Invalid type for '{field}[{index}].content': expected a string or an array of content parts, but got {} instead.",
                        json_type_name(raw)
                    ),
                    param: Some(field),
                    code: None,
                })?;
                Ok(content.into_text())
            })
            .collect::<Result<Vec<_>, Error>>()?;
        prompts.reverse();
        Ok(prompts)
    }

    /// The body to send upstream: the original fields, in order and byte for byte, with
    /// every `model` field replaced by `upstream_model`.
    #[must_use]
    pub fn rewrite_model(&self, upstream_model: &str) -> Vec<u8> {
        let capacity = self
            .fields
            .iter()
            .map(|(key, value)| key.len() + value.get().len() + 4)
            .sum::<usize>()
            + upstream_model.len()
            + 2;
        let mut out = Vec::with_capacity(capacity);
        out.push(b'{');
        for (position, (key, value)) in self.fields.iter().enumerate() {
            if position > 0 {
                out.push(b',');
            }
            write_json_string(&mut out, key);
            out.push(b':');
            if key == "model" {
                write_json_string(&mut out, upstream_model);
            } else {
                out.extend_from_slice(value.get().as_bytes());
            }
        }
        out.push(b'}');
        out
    }
}

/// The text of the last user message in a `messages` array (chat logs, prompt files),
/// read exactly as routed requests are; `None` if there is no user message.
#[must_use]
pub fn last_user_text(messages: &serde_json::Value) -> Option<String> {
    user_texts(messages, 1)?.pop()
}

/// A message's text for a person or a judge to read: its content as routers read it, and
/// any tool calls an assistant message makes, each as `[calls name(arguments)]`.
#[must_use]
pub fn message_text(message: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut text = match message.get("content") {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(content) => Content::deserialize(content).map_or_else(|_| content.to_string(), Content::into_text),
    };
    let calls = message
        .get("tool_calls")
        .and_then(serde_json::Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    for call in calls {
        let function = call.get("function");
        let field = |name: &str| {
            function
                .and_then(|function| function.get(name))
                .and_then(serde_json::Value::as_str)
        };
        if !text.is_empty() {
            text.push('\n');
        }
        let _ = write!(
            text,
            "[calls {}({})]",
            field("name").unwrap_or("?"),
            field("arguments").unwrap_or("")
        );
    }
    text
}

/// The texts of the last `limit` user messages (at least one) in a `messages` array,
/// oldest first, as [`last_user_text`] reads each; `None` if there is no user message or
/// one of them is not a string or an array of content parts.
#[must_use]
pub fn user_texts(messages: &serde_json::Value, limit: usize) -> Option<Vec<String>> {
    let mut texts = messages
        .as_array()?
        .iter()
        .filter(|message| message.get("role").and_then(serde_json::Value::as_str) == Some("user"))
        .rev()
        .take(limit.max(1))
        .map(|message| match message.get("content") {
            None | Some(serde_json::Value::Null) => Some(String::new()),
            Some(content) => Content::deserialize(content).ok().map(Content::into_text),
        })
        .collect::<Option<Vec<_>>>()?;
    if texts.is_empty() {
        return None;
    }
    texts.reverse();
    Some(texts)
}

/// The messages, checked for shape: a non-empty array of objects with a string `role`.
fn parse_messages(raw: Option<&RawValue>) -> Result<Vec<(usize, Message<'_>)>, Error> {
    let raw = raw.ok_or(Error::missing_param("messages"))?;
    let messages = Vec::<Message<'_>>::deserialize(raw).map_err(|error| {
        Error::invalid_param(
            format!("Invalid 'messages': expected an array of message objects, each with a string 'role' ({error})."),
            "messages",
        )
    })?;
    if messages.is_empty() {
        return Err(Error::invalid_param(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            "messages",
        ));
    }
    Ok(messages.into_iter().enumerate().collect())
}

/// The Responses API's `input`: a string (one user message) or an array of items, of which
/// those with a `role` are messages.
fn parse_input(raw: Option<&RawValue>) -> Result<Vec<(usize, Message<'_>)>, Error> {
    let raw = raw.ok_or(Error::missing_param("input"))?;
    if raw.get().starts_with('"') {
        let message = Message {
            role: Cow::Borrowed("user"),
            content: Some(raw),
        };
        return Ok(vec![(0, message)]);
    }
    let items = Vec::<InputItem<'_>>::deserialize(raw).map_err(|error| {
        Error::invalid_param(
            format!("Invalid 'input': expected a string or an array of input items ({error})."),
            "input",
        )
    })?;
    Ok(items
        .into_iter()
        .enumerate()
        .filter_map(|(index, item)| {
            let role = item.role?;
            Some((
                index,
                Message {
                    role,
                    content: item.content,
                },
            ))
        })
        .collect())
}

/// The legacy Completions API's `prompt`: a string, an array of strings (each read as a
/// user turn), or token ids (an array of integers, or of such arrays), which carry no text
/// to score and are forwarded as they are.
fn parse_prompt(raw: Option<&RawValue>) -> Result<Vec<(usize, Message<'_>)>, Error> {
    let raw = raw.ok_or(Error::missing_param("prompt"))?;
    let user = |index, content| {
        (
            index,
            Message {
                role: Cow::Borrowed("user"),
                content: Some(content),
            },
        )
    };
    if raw.get().starts_with('"') {
        return Ok(vec![user(0, raw)]);
    }
    let invalid = || {
        Error::invalid_param(
            format!(
                "Invalid type for 'prompt': expected a string, an array of strings, an array of integers \
                 or an array of arrays of integers, but got {} instead.",
                json_type_name(raw)
            ),
            "prompt",
        )
    };
    let items = Vec::<&RawValue>::deserialize(raw).map_err(|_| invalid())?;
    if items.is_empty() {
        return Err(Error::invalid_param(
            "Invalid 'prompt': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            "prompt",
        ));
    }
    if items.iter().all(|item| item.get().starts_with('"')) {
        return Ok(items
            .into_iter()
            .enumerate()
            .map(|(index, item)| user(index, item))
            .collect());
    }
    let token_ids = items.iter().all(|item| i64::deserialize(*item).is_ok())
        || items.iter().all(|item| Vec::<i64>::deserialize(*item).is_ok());
    if token_ids { Ok(Vec::new()) } else { Err(invalid()) }
}

/// JSON objects may repeat a key; like most parsers (and OpenAI), the last one wins.
fn last_field<'a>(fields: &[(Cow<'a, str>, &'a RawValue)], name: &str) -> Option<&'a RawValue> {
    fields
        .iter()
        .rev()
        .find(|(key, _)| key == name)
        .map(|(_, value)| *value)
}

fn write_json_string(out: &mut Vec<u8>, text: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

fn json_type_name(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// The top-level object as an ordered list of raw fields.
struct TopLevel<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = TopLevel<'de>;

            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    fields.push((key, value));
                }
                Ok(TopLevel(fields))
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

#[derive(Debug, Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

/// One item of a Responses `input` array: a message has a `role`; function-call outputs,
/// reasoning items and references do not.
#[derive(Deserialize)]
struct InputItem<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    r#type: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn into_text(self) -> String {
        match self {
            Content::Text(text) => text,
            Content::Parts(parts) => {
                let texts: Vec<String> = parts
                    .into_iter()
                    .filter(|part| matches!(part.r#type.as_deref(), Some("text" | "input_text") | None))
                    .filter_map(|part| part.text)
                    .collect();
                texts.join("\n")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(body: &str) -> Error {
        ModelRequest::parse(Api::ChatCompletions, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn rewrite_replaces_only_model_and_keeps_bytes() {
        let body = r#"{"model":"router-mf-0.1","temperature":1.0,"messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"x":{"type":"number"}}}}}],"x_vendor":{"a":[1,2e3]}}"#;
        let request = ModelRequest::parse(Api::ChatCompletions, body.as_bytes()).unwrap();
        let out = String::from_utf8(request.rewrite_model("gpt-4o")).unwrap();
        assert_eq!(out, body.replace("router-mf-0.1", "gpt-4o"));
    }

    #[test]
    fn rewrite_escapes_the_new_model_name() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let request = ModelRequest::parse(Api::ChatCompletions, body.as_bytes()).unwrap();
        let out = request.rewrite_model("a\"b");
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["model"], "a\"b");
    }

    #[test]
    fn prompt_is_last_user_message() {
        let body = r#"{"model":"m","messages":[
            {"role":"system","content":"be brief"},
            {"role":"user","content":"first"},
            {"role":"assistant","content":"ok"},
            {"role":"user","content":"second \u00e9"},
            {"role":"tool","content":"result","tool_call_id":"x"}]}"#;
        let request = ModelRequest::parse(Api::ChatCompletions, body.as_bytes()).unwrap();
        assert_eq!(request.last_user_prompt().unwrap(), "second é");
    }

    #[test]
    fn user_prompts_are_the_last_user_turns_oldest_first() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"s"},{"role":"user","content":"one"},
            {"role":"assistant","content":"a"},{"role":"user","content":[{"type":"text","text":"two"}]},
            {"role":"assistant","content":"b"},{"role":"user","content":"three"}]}"#;
        let request = ModelRequest::parse(Api::ChatCompletions, body).unwrap();
        assert_eq!(request.user_prompts(8).unwrap(), ["one", "two", "three"]);
        assert_eq!(request.user_prompts(2).unwrap(), ["two", "three"]);
        assert_eq!(request.user_prompts(0).unwrap(), ["three"]);
        let bad_earlier_turn =
            br#"{"model":"m","messages":[{"role":"user","content":5},{"role":"user","content":"x"}]}"#;
        let request = ModelRequest::parse(Api::ChatCompletions, bad_earlier_turn).unwrap();
        assert_eq!(request.last_user_prompt().unwrap(), "x");
        let error = request.user_prompts(8).unwrap_err().to_string();
        assert!(error.contains("messages[0].content"), "{error}");
        let no_user = br#"{"model":"m","messages":[{"role":"system","content":"s"}]}"#;
        let request = ModelRequest::parse(Api::ChatCompletions, no_user).unwrap();
        assert!(request.user_prompts(8).unwrap_err().to_string().contains("role 'user'"));
    }

    #[test]
    fn content_parts_join_text_and_skip_images() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"text","text":"look at"},
            {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}},
            {"type":"text","text":"this"}]}]}"#;
        let request = ModelRequest::parse(Api::ChatCompletions, body.as_bytes()).unwrap();
        assert_eq!(request.last_user_prompt().unwrap(), "look at\nthis");
    }

    #[test]
    fn null_content_scores_as_empty() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":null}]}"#;
        let request = ModelRequest::parse(Api::ChatCompletions, body.as_bytes()).unwrap();
        assert_eq!(request.last_user_prompt().unwrap(), "");
    }

    #[test]
    fn last_user_text_from_a_chat_log() {
        let messages = serde_json::json!([
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]);
        assert_eq!(last_user_text(&messages).as_deref(), Some("a\nb"));
        let conversation = serde_json::json!([
            {"role": "user", "content": "one"}, {"role": "assistant", "content": "x"},
            {"role": "user", "content": null}, {"role": "user", "content": [{"type": "text", "text": "three"}]}
        ]);
        assert_eq!(user_texts(&conversation, 8).unwrap(), ["one", "", "three"]);
        assert_eq!(user_texts(&conversation, 2).unwrap(), ["", "three"]);
        assert_eq!(
            last_user_text(&serde_json::json!([{"role": "system", "content": "x"}])),
            None
        );
    }

    #[test]
    fn stream_flag_is_read() {
        let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}]}"#;
        assert!(
            ModelRequest::parse(Api::ChatCompletions, body.as_bytes())
                .unwrap()
                .stream()
        );
        let body = r#"{"model":"m","stream":null,"messages":[{"role":"user","content":"x"}]}"#;
        assert!(
            !ModelRequest::parse(Api::ChatCompletions, body.as_bytes())
                .unwrap()
                .stream()
        );
    }

    #[test]
    fn malformed_bodies_are_explained() {
        assert!(
            error_of("{not json")
                .to_string()
                .contains("could not parse the JSON body")
        );
        assert!(error_of("").to_string().contains("could not parse the JSON body"));
        assert!(error_of("[1,2]").to_string().contains("must be a JSON object"));
        assert!(
            error_of(r#"{"messages":[]}"#)
                .to_string()
                .contains("must provide a model")
        );
        assert!(error_of(r#"{"model":"m"}"#).to_string().contains("'messages'"));
        assert!(
            error_of(r#"{"model":3,"messages":[]}"#)
                .to_string()
                .contains("got a number")
        );
        assert!(
            error_of(r#"{"model":"m","messages":[]}"#)
                .to_string()
                .contains("empty array")
        );
        assert!(
            error_of(r#"{"model":"m","messages":"hi"}"#)
                .to_string()
                .contains("array of message objects")
        );
        assert!(
            error_of(r#"{"model":"m","messages":[{"content":"x"}]}"#)
                .to_string()
                .contains("'role'")
        );
        assert!(
            error_of(r#"{"model":"m","stream":"yes","messages":[{"role":"user","content":"x"}]}"#)
                .to_string()
                .contains("'stream'")
        );
    }

    #[test]
    fn routing_needs_a_user_message() {
        let body = r#"{"model":"m","messages":[{"role":"system","content":"x"}]}"#;
        let request = ModelRequest::parse(Api::ChatCompletions, body.as_bytes()).unwrap();
        assert!(
            request
                .last_user_prompt()
                .unwrap_err()
                .to_string()
                .contains("role 'user'")
        );
        let body = r#"{"model":"m","messages":[{"role":"user","content":5}]}"#;
        let request = ModelRequest::parse(Api::ChatCompletions, body.as_bytes()).unwrap();
        assert!(request.last_user_prompt().unwrap_err().to_string().contains("content"));
    }

    #[test]
    fn responses_input_is_a_string_or_the_last_user_item() {
        let body = r#"{"model":"router-mf-0.2","instructions":"be brief","input":"What is 2+2?","stream":true}"#;
        let request = ModelRequest::parse(Api::Responses, body.as_bytes()).unwrap();
        assert_eq!(request.last_user_prompt().unwrap(), "What is 2+2?");
        assert!(request.stream());
        assert_eq!(
            String::from_utf8(request.rewrite_model("gpt-4o")).unwrap(),
            body.replace("router-mf-0.2", "gpt-4o")
        );
        let body = r#"{"model":"m","input":[
            {"role":"user","content":"first"},
            {"type":"message","role":"user","content":[
                {"type":"input_text","text":"look at"},
                {"type":"input_image","image_url":"data:image/png;base64,AAAA"},
                {"type":"input_text","text":"this"}]},
            {"type":"function_call","call_id":"c1","name":"f","arguments":"{}"},
            {"type":"function_call_output","call_id":"c1","output":"42"}]}"#;
        let request = ModelRequest::parse(Api::Responses, body.as_bytes()).unwrap();
        assert_eq!(request.last_user_prompt().unwrap(), "look at\nthis");
    }

    #[test]
    fn responses_input_errors_name_the_input_field() {
        let missing = ModelRequest::parse(Api::Responses, br#"{"model":"m"}"#).unwrap_err();
        assert_eq!(missing.param(), Some("input"));
        let wrong = ModelRequest::parse(Api::Responses, br#"{"model":"m","input":5}"#).unwrap_err();
        assert_eq!(wrong.param(), Some("input"));
        let body = br#"{"model":"m","input":[{"role":"system","content":"x"},{"type":"item_reference","id":"msg_1"}]}"#;
        let no_user = ModelRequest::parse(Api::Responses, body)
            .unwrap()
            .last_user_prompt()
            .unwrap_err();
        assert_eq!(no_user.param(), Some("input"));
        assert!(no_user.to_string().contains("role 'user'"), "{no_user}");
        let body = br#"{"model":"m","input":[{"type":"function_call_output","call_id":"c","output":"1"},{"role":"user","content":7}]}"#;
        let bad_content = ModelRequest::parse(Api::Responses, body)
            .unwrap()
            .last_user_prompt()
            .unwrap_err();
        assert!(bad_content.to_string().contains("'input[1].content'"), "{bad_content}");
    }

    #[test]
    fn completions_prompt_is_a_string_or_a_batch_of_strings() {
        let body = br#"{"model":"m","prompt":"Once upon a time","max_tokens":5}"#;
        let request = ModelRequest::parse(Api::Completions, body).unwrap();
        assert_eq!(request.last_user_prompt().unwrap(), "Once upon a time");
        assert_eq!(
            request.rewrite_model("up"),
            br#"{"model":"up","prompt":"Once upon a time","max_tokens":5}"#
        );
        let batch = br#"{"model":"m","prompt":["first","second","third"]}"#;
        let request = ModelRequest::parse(Api::Completions, batch).unwrap();
        assert_eq!(request.last_user_prompt().unwrap(), "third");
        assert_eq!(request.user_prompts(2).unwrap(), ["second", "third"]);
    }

    #[test]
    fn completions_token_prompts_are_forwarded_but_cannot_be_routed() {
        for prompt in ["[1734, 318]", "[[1734, 318], [50256]]"] {
            let body = format!(r#"{{"model":"m","prompt":{prompt}}}"#);
            let request = ModelRequest::parse(Api::Completions, body.as_bytes()).unwrap();
            assert_eq!(
                request.rewrite_model("up"),
                format!(r#"{{"model":"up","prompt":{prompt}}}"#).as_bytes()
            );
            let error = request.last_user_prompt().unwrap_err();
            assert_eq!(error.param(), Some("prompt"));
            assert!(error.to_string().contains("token ids"), "{error}");
        }
    }

    #[test]
    fn completions_prompt_errors_name_the_prompt_field() {
        for body in [
            r#"{"model":"m"}"#,
            r#"{"model":"m","prompt":5}"#,
            r#"{"model":"m","prompt":[]}"#,
            r#"{"model":"m","prompt":["text",5]}"#,
            r#"{"model":"m","prompt":[{"text":"x"}]}"#,
        ] {
            let error = ModelRequest::parse(Api::Completions, body.as_bytes()).unwrap_err();
            assert_eq!(error.param(), Some("prompt"), "{body}");
            assert_eq!(error.status(), axum::http::StatusCode::BAD_REQUEST, "{body}");
        }
    }
}
