//! Request bodies for all three APIs: parsing never panics, the scored turns agree, and the body
//! forwarded upstream is JSON equal to the client's with only `model` replaced.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routellm::request::{Api, ModelRequest};

/// A provider model name with characters JSON must escape.
const UPSTREAM_MODEL: &str = "up/\"model\\\u{1}é";

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let api = match first % 3 {
        0 => Api::ChatCompletions,
        1 => Api::Responses,
        _ => Api::Completions,
    };
    let Ok(request) = ModelRequest::parse(api, body) else {
        return;
    };
    let _ = request.model();
    let _ = request.stream();
    // The turns `score_turns: max` scores end with the one `last` scores.
    if let (Ok(last), Ok(turns)) = (request.last_user_prompt(), request.user_prompts(8)) {
        assert!((1..=8).contains(&turns.len()));
        assert_eq!(turns.last(), Some(&last));
    }
    let rewritten = request.rewrite_model(UPSTREAM_MODEL);
    let Ok(mut original) = serde_json::from_slice::<serde_json::Value>(body) else {
        // serde_json::Value refuses some numbers the raw parser keeps (1e400): the rewrite
        // must still be JSON text.
        let text = std::str::from_utf8(&rewritten).expect("rewritten body is UTF-8");
        let _: Box<serde_json::value::RawValue> = serde_json::from_str(text).expect("rewritten body is JSON");
        return;
    };
    let parsed: serde_json::Value = serde_json::from_slice(&rewritten).expect("rewritten body is JSON");
    original["model"] = serde_json::Value::String(UPSTREAM_MODEL.into());
    assert_eq!(parsed, original);
});
