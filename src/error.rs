//! The one error type of the library, its HTTP status mapping and its OpenAI-shaped JSON body.
//!
//! Every failure a client can cause or observe ends up here, so the wire shape
//! `{"error":{"message","type","param","code"}}` is produced in exactly one place.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::routers::RouterError;

/// Everything that can go wrong while configuring, routing or forwarding.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The client sent something we cannot act on (OpenAI's `invalid_request_error`).
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
        code: Option<&'static str>,
    },
    /// The request named a model that is neither a router nor a configured model.
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    /// No endpoint at this method and path.
    #[error("Invalid URL ({method} {path})")]
    UnknownUrl { method: String, path: String },
    /// Proxy authentication is configured and the request did not pass it.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The client's API key is over its requests or tokens per minute.
    #[error("{0}")]
    RateLimited(crate::api_keys::RateLimited),
    /// The client's API key has spent its budget.
    #[error("{0}")]
    BudgetExceeded(crate::budgets::BudgetExceeded),
    /// The keys' shared limits (Redis) cannot be reached and `shared_state.on_failure` is `refuse`.
    #[error("The rate limits could not be checked: their shared store is unavailable. Please retry later.")]
    LimitsUnavailable,
    /// The request body exceeds the configured limit.
    #[error("Request body too large: the limit is {limit} bytes.")]
    PayloadTooLarge { limit: usize },
    /// The client did not send the request body within `client_timeout_secs`.
    #[error("The request body did not arrive within {seconds} s.")]
    ClientTimeout { seconds: f64 },
    /// The upstream could not be reached, or broke the connection before answering.
    #[error("Upstream `{model}` is unreachable: {reason}")]
    UpstreamUnreachable { model: String, reason: String },
    /// The upstream answered with an error status (library callers; the server passes these through).
    #[error("Upstream `{model}` answered {status}: {body}")]
    UpstreamStatus {
        model: String,
        status: StatusCode,
        body: String,
    },
    /// The upstream took longer than the configured timeout.
    #[error("Upstream `{model}` timed out: {reason}")]
    UpstreamTimeout { model: String, reason: String },
    /// The upstream answered, but not with something we can pass on.
    #[error("Upstream `{model}` sent an invalid response: {reason}")]
    UpstreamProtocol { model: String, reason: String },
    /// A router failed to score a prompt. (The cause is part of the message, not a
    /// `source`: printed as a chain, it would appear twice.)
    #[error("Router `{router}` failed: {cause}")]
    Router { router: String, cause: RouterError },
    /// A router did not score within `scoring_timeout_ms` (a burst queued for the scoring
    /// slots, or a slow embeddings endpoint).
    #[error(
        "Router `{router}` did not score the prompt within {limit_ms} ms (scoring_timeout_ms); the server is busy, retry later."
    )]
    RouterTimeout { router: String, limit_ms: u128 },
    /// The configuration is invalid; reported at start-up, never per request.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Reading a file failed (the cause is in the message, as for `Router`).
    #[error("{path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    /// A bug or an exhausted resource on our side.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// A 400 `invalid_request_error` with an explanatory message.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidRequest {
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// A 400 `invalid_request_error` naming the offending parameter.
    pub fn invalid_param(message: impl Into<String>, param: &'static str) -> Self {
        Error::InvalidRequest {
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }

    /// OpenAI's error for a required body field that is absent.
    #[must_use]
    pub fn missing_param(param: &'static str) -> Self {
        Error::InvalidRequest {
            message: format!("Missing required parameter: '{param}'."),
            param: Some(param),
            code: Some("missing_required_parameter"),
        }
    }

    /// `router` failed to load or score.
    #[must_use]
    pub fn router(router: &str, cause: RouterError) -> Self {
        Error::Router {
            router: router.to_owned(),
            cause,
        }
    }

    pub fn io(path: impl Into<String>, cause: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause,
        }
    }

    /// The HTTP status this error is reported with.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Error::ModelNotFound(_) | Error::UnknownUrl { .. } => StatusCode::NOT_FOUND,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::RateLimited(_) | Error::BudgetExceeded(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::ClientTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Error::UpstreamUnreachable { .. } | Error::UpstreamProtocol { .. } => StatusCode::BAD_GATEWAY,
            Error::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Error::UpstreamStatus { status, .. } => *status,
            Error::RouterTimeout { .. } | Error::LimitsUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Error::Router { .. } | Error::Config(_) | Error::Io { .. } | Error::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// OpenAI's `type` field for this error.
    fn kind(&self) -> &'static str {
        match self {
            Error::InvalidRequest { .. }
            | Error::ModelNotFound(_)
            | Error::UnknownUrl { .. }
            | Error::PayloadTooLarge { .. }
            | Error::ClientTimeout { .. } => "invalid_request_error",
            Error::Unauthorized(_) => "authentication_error",
            // OpenAI's rate-limit errors are typed by the limit: `requests` or `tokens`.
            Error::RateLimited(limited) => limited.limit.as_str(),
            // OpenAI's answer when an account's quota or budget is used up.
            Error::BudgetExceeded(_) => "insufficient_quota",
            Error::UpstreamUnreachable { .. }
            | Error::UpstreamTimeout { .. }
            | Error::UpstreamStatus { .. }
            | Error::UpstreamProtocol { .. } => "upstream_error",
            Error::Router { .. }
            | Error::RouterTimeout { .. }
            | Error::LimitsUnavailable
            | Error::Config(_)
            | Error::Io { .. }
            | Error::Internal(_) => "server_error",
        }
    }

    /// The request field the error is about, if any (OpenAI's `param`).
    #[must_use]
    pub fn param(&self) -> Option<&'static str> {
        match self {
            Error::InvalidRequest { param, .. } => *param,
            Error::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            Error::InvalidRequest { code, .. } => *code,
            Error::ModelNotFound(_) => Some("model_not_found"),
            Error::Unauthorized(_) => Some("invalid_api_key"),
            Error::RateLimited(_) => Some("rate_limit_exceeded"),
            Error::BudgetExceeded(_) => Some("insufficient_quota"),
            Error::PayloadTooLarge { .. } => Some("request_too_large"),
            Error::ClientTimeout { .. } => Some("request_timeout"),
            Error::UpstreamUnreachable { .. } => Some("upstream_unreachable"),
            Error::UpstreamTimeout { .. } => Some("upstream_timeout"),
            Error::UpstreamStatus { .. } => Some("upstream_status"),
            Error::UpstreamProtocol { .. } => Some("upstream_invalid_response"),
            Error::Router { .. } => Some("router_error"),
            Error::RouterTimeout { .. } => Some("router_timeout"),
            Error::LimitsUnavailable => Some("limits_unavailable"),
            Error::UnknownUrl { .. } | Error::Config(_) | Error::Io { .. } | Error::Internal(_) => None,
        }
    }

    /// What the client is told. Server-side failures name what failed but keep their
    /// details (an embeddings endpoint's address and answer, file paths) for the server
    /// log, as OpenAI's own 500s do: they can carry internal addresses or echoed keys.
    fn client_message(&self) -> String {
        match self {
            Error::Router { router, .. } => {
                format!("Router `{router}` could not score the prompt; the details are in the server log.")
            }
            Error::Config(_) | Error::Io { .. } | Error::Internal(_) => {
                "The server had an error while processing your request; the details are in the server log.".to_owned()
            }
            other => other.to_string(),
        }
    }

    /// The OpenAI-shaped JSON body, `{"error":{"message","type","param","code"}}`.
    #[must_use]
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct Body<'a> {
            error: Detail<'a>,
        }
        #[derive(Serialize)]
        struct Detail<'a> {
            message: &'a str,
            r#type: &'static str,
            param: Option<&'static str>,
            code: Option<&'static str>,
        }
        let message = self.client_message();
        let body = Body {
            error: Detail {
                message: &message,
                r#type: self.kind(),
                param: self.param(),
                code: self.code(),
            },
        };
        // Serialising a struct of strings cannot fail; the fallback only keeps us panic-free.
        serde_json::to_string(&body).unwrap_or_else(|_| {
            r#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#.to_owned()
        })
    }

    /// The error as the Responses API's stream event (`event: error`) carries it: flat, with
    /// `type: "error"` and the error's code (or, lacking one, its type) as `code`.
    #[must_use]
    pub fn to_responses_event_json(&self) -> String {
        #[derive(Serialize)]
        struct Event<'a> {
            r#type: &'static str,
            code: &'static str,
            message: &'a str,
            param: Option<&'static str>,
        }
        let message = self.client_message();
        let event = Event {
            r#type: "error",
            code: self.code().unwrap_or_else(|| self.kind()),
            message: &message,
            param: self.param(),
        };
        serde_json::to_string(&event).unwrap_or_else(|_| {
            r#"{"type":"error","code":"server_error","message":"internal error","param":null}"#.to_owned()
        })
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, "request rejected");
        }
        let mut response = (status, self.to_json()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Error::RateLimited(limited) = &self {
            // OpenAI's SDKs wait `retry-after-ms` (else `retry-after`, whole seconds) before
            // their automatic retry, so a client over its limit backs off by itself.
            let millis = limited.retry_after_millis();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(millis.div_ceil(1000)));
            headers.insert(
                axum::http::HeaderName::from_static("retry-after-ms"),
                HeaderValue::from(millis),
            );
        }
        if let Error::BudgetExceeded(_) = &self {
            // The SDKs retry a 429 unless told not to; a spent budget does not come back in
            // the seconds a retry waits.
            headers.insert(
                axum::http::HeaderName::from_static("x-should-retry"),
                HeaderValue::from_static("false"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(error: &Error) -> serde_json::Value {
        serde_json::from_str(&error.to_json()).unwrap()
    }

    #[test]
    fn invalid_request_has_openai_shape() {
        let error = Error::missing_param("messages");
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        let json = parsed(&error);
        assert_eq!(json["error"]["message"], "Missing required parameter: 'messages'.");
        assert_eq!(json["error"]["type"], "invalid_request_error");
        assert_eq!(json["error"]["param"], "messages");
        assert_eq!(json["error"]["code"], "missing_required_parameter");
    }

    #[test]
    fn null_fields_are_present_not_omitted() {
        let json = parsed(&Error::invalid("bad"));
        let detail = json["error"].as_object().unwrap();
        assert!(detail.contains_key("param") && detail["param"].is_null());
        assert!(detail.contains_key("code") && detail["code"].is_null());
    }

    #[test]
    fn upstream_failures_are_gateway_errors() {
        let unreachable = Error::UpstreamUnreachable {
            model: "m".into(),
            reason: "refused".into(),
        };
        assert_eq!(unreachable.status(), StatusCode::BAD_GATEWAY);
        let timeout = Error::UpstreamTimeout {
            model: "m".into(),
            reason: "slow".into(),
        };
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(parsed(&timeout)["error"]["code"], "upstream_timeout");
    }

    #[test]
    fn server_side_details_stay_in_the_log() {
        let error = Error::Router {
            router: "mf".into(),
            cause: RouterError::Score("embeddings endpoint http://10.0.0.7/v1: HTTP 401: key sk-...cdef".into()),
        };
        let json = parsed(&error);
        assert_eq!(json["error"]["code"], "router_error");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("`mf`") && !message.contains("10.0.0.7") && !message.contains("sk-"),
            "{message}"
        );
        assert!(error.to_string().contains("10.0.0.7"), "the log line keeps the cause");
        assert!(
            std::error::Error::source(&error).is_none(),
            "so a printed chain names it once"
        );
        let internal = parsed(&Error::Internal("/srv/routers/mf: corrupt".into()));
        assert!(!internal["error"]["message"].as_str().unwrap().contains("/srv"));
    }

    #[test]
    fn unknown_model_is_404_like_openai() {
        let error = Error::ModelNotFound("gpt-9".into());
        assert_eq!(error.status(), StatusCode::NOT_FOUND);
        assert_eq!(parsed(&error)["error"]["code"], "model_not_found");
    }
}
