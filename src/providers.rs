//! LiteLLM-style model names (`<provider>/<model>`) resolved to OpenAI-compatible endpoints.
//!
//! RouteLLM hands model names to LiteLLM; its users write `together_ai/...` or
//! `groq/...` and expect the conventional API-key variables to be picked up. We speak
//! to every provider through its OpenAI-compatible endpoint, so a provider is just a
//! base URL and the names of the environment variables that configure it.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{self, ModelConfig, Price, ProviderConfig, Secret};
use crate::error::Error;

/// A provider known without configuration.
#[derive(Debug, Clone, Copy)]
pub struct BuiltinProvider {
    /// Prefixes that select it (`together` and LiteLLM's `together_ai`).
    pub prefixes: &'static [&'static str],
    pub default_base_url: &'static str,
    /// Environment variables holding its API key, first found wins.
    pub key_vars: &'static [&'static str],
    /// Environment variable overriding its base URL.
    pub base_url_var: &'static str,
}

/// The providers a model prefix can name without any configuration.
pub const BUILTIN: &[BuiltinProvider] = &[
    BuiltinProvider {
        prefixes: &["openai"],
        default_base_url: "https://api.openai.com/v1",
        key_vars: &["OPENAI_API_KEY"],
        base_url_var: "OPENAI_BASE_URL",
    },
    // Anthropic's and Google's OpenAI-compatible endpoints (Chat Completions only), so
    // Claude or Gemini can be the strong model with one flag and their usual key variable.
    BuiltinProvider {
        prefixes: &["anthropic"],
        default_base_url: "https://api.anthropic.com/v1",
        key_vars: &["ANTHROPIC_API_KEY"],
        base_url_var: "ANTHROPIC_BASE_URL",
    },
    BuiltinProvider {
        prefixes: &["gemini"],
        default_base_url: "https://generativelanguage.googleapis.com/v1beta/openai",
        key_vars: &["GEMINI_API_KEY", "GOOGLE_API_KEY"],
        base_url_var: "GEMINI_BASE_URL",
    },
    BuiltinProvider {
        prefixes: &["together", "together_ai"],
        default_base_url: "https://api.together.xyz/v1",
        key_vars: &["TOGETHER_API_KEY", "TOGETHERAI_API_KEY", "TOGETHER_AI_API_KEY"],
        base_url_var: "TOGETHER_BASE_URL",
    },
    BuiltinProvider {
        prefixes: &["groq"],
        default_base_url: "https://api.groq.com/openai/v1",
        key_vars: &["GROQ_API_KEY"],
        base_url_var: "GROQ_BASE_URL",
    },
    BuiltinProvider {
        prefixes: &["fireworks_ai", "fireworks"],
        default_base_url: "https://api.fireworks.ai/inference/v1",
        key_vars: &["FIREWORKS_AI_API_KEY", "FIREWORKS_API_KEY"],
        base_url_var: "FIREWORKS_AI_BASE_URL",
    },
    BuiltinProvider {
        prefixes: &["deepinfra"],
        default_base_url: "https://api.deepinfra.com/v1/openai",
        key_vars: &["DEEPINFRA_API_KEY"],
        base_url_var: "DEEPINFRA_BASE_URL",
    },
    BuiltinProvider {
        prefixes: &["mistral"],
        default_base_url: "https://api.mistral.ai/v1",
        key_vars: &["MISTRAL_API_KEY"],
        base_url_var: "MISTRAL_BASE_URL",
    },
    BuiltinProvider {
        prefixes: &["openrouter"],
        default_base_url: "https://openrouter.ai/api/v1",
        key_vars: &["OPENROUTER_API_KEY"],
        base_url_var: "OPENROUTER_BASE_URL",
    },
    BuiltinProvider {
        prefixes: &["anyscale"],
        default_base_url: "https://api.endpoints.anyscale.com/v1",
        key_vars: &["ANYSCALE_API_KEY"],
        base_url_var: "ANYSCALE_BASE_URL",
    },
    BuiltinProvider {
        prefixes: &["deepseek"],
        default_base_url: "https://api.deepseek.com/v1",
        key_vars: &["DEEPSEEK_API_KEY"],
        base_url_var: "DEEPSEEK_BASE_URL",
    },
    BuiltinProvider {
        prefixes: &["perplexity"],
        default_base_url: "https://api.perplexity.ai",
        key_vars: &["PERPLEXITYAI_API_KEY", "PERPLEXITY_API_KEY"],
        base_url_var: "PERPLEXITY_BASE_URL",
    },
    BuiltinProvider {
        prefixes: &["xai"],
        default_base_url: "https://api.x.ai/v1",
        key_vars: &["XAI_API_KEY"],
        base_url_var: "XAI_BASE_URL",
    },
    BuiltinProvider {
        prefixes: &["ollama", "ollama_chat"],
        default_base_url: "http://localhost:11434/v1",
        key_vars: &["OLLAMA_API_KEY"],
        base_url_var: "OLLAMA_BASE_URL",
    },
    BuiltinProvider {
        prefixes: &["vllm", "hosted_vllm"],
        default_base_url: "http://localhost:8000/v1",
        key_vars: &["VLLM_API_KEY", "HOSTED_VLLM_API_KEY"],
        base_url_var: "VLLM_BASE_URL",
    },
];

/// The prefix of the built-in offline provider that answers locally.
pub const ECHO_PREFIX: &str = "echo";

/// Where a configured model is served.
#[derive(Debug, Clone, PartialEq)]
pub enum Endpoint {
    /// An OpenAI-compatible HTTP API.
    Http {
        /// Base URL without a trailing slash; `/chat/completions` is appended.
        base_url: String,
        api_key: Option<Secret>,
        /// Configured extra headers, environment references expanded, marked sensitive
        /// (a gateway key is a secret like any other).
        headers: HeaderMap,
    },
    /// The built-in offline provider: answers locally with the routing decision.
    Echo,
}

/// A configured model resolved to its endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedModel {
    /// The name as configured, e.g. `together_ai/mistralai/Mixtral-8x7B-Instruct-v0.1`.
    pub name: String,
    /// The name the provider knows it by, sent as the upstream `model`.
    pub provider_model: String,
    /// The provider's name, for logs and `/v1/models`.
    pub provider: String,
    /// What the model charges, if configured, for the cost counters.
    pub price: Option<Price>,
    /// Its share of its tier's requests relative to the other deployments' (at least 1).
    pub weight: u32,
    pub endpoint: Endpoint,
}

impl ResolvedModel {
    /// Whether an answer this model's provider stored (a Responses `previous_response_id`)
    /// is visible to `other` too: the same endpoint, key and headers, or both offline.
    #[must_use]
    pub fn shares_storage_with(&self, other: &ResolvedModel) -> bool {
        match (&self.endpoint, &other.endpoint) {
            (Endpoint::Echo, Endpoint::Echo) => true,
            (
                Endpoint::Http {
                    base_url,
                    api_key,
                    headers,
                },
                Endpoint::Http {
                    base_url: other_url,
                    api_key: other_key,
                    headers: other_headers,
                },
            ) => base_url == other_url && api_key == other_key && headers == other_headers,
            _ => false,
        }
    }

    /// Why requests to this model will likely be refused, said at start-up rather than
    /// discovered as a 401 on the first request: a remote endpoint and no key. Endpoints on
    /// this machine (Ollama, vLLM) commonly need none.
    #[must_use]
    pub fn missing_key_warning(&self) -> Option<String> {
        let Endpoint::Http {
            base_url,
            api_key: None,
            headers,
        } = &self.endpoint
        else {
            return None;
        };
        // Azure's `api-key`, Anthropic's and others' `x-api-key`, Google's `x-goog-api-key`:
        // credentials configured as a header are credentials all the same.
        if CREDENTIAL_HEADERS.iter().any(|name| headers.contains_key(*name)) {
            return None;
        }
        let host = reqwest::Url::parse(base_url).ok()?.host_str()?.to_owned();
        let local = matches!(host.as_str(), "localhost" | "127.0.0.1" | "[::1]" | "::1");
        (!local).then(|| {
            format!(
                "no API key for `{}` ({base_url}): set the {} provider's key variable, the model's `api_key`, \
                 or --api-key; requests go without credentials until then",
                self.name, self.provider
            )
        })
    }
}

/// Header names that carry an API key in place of `Authorization: Bearer`.
const CREDENTIAL_HEADERS: [&str; 4] = ["api-key", "x-api-key", "x-goog-api-key", "ocp-apim-subscription-key"];

/// Settings that apply to both models (RouteLLM's `--base-url` and `--api-key`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GlobalOverrides {
    pub base_url: Option<String>,
    pub api_key: Option<Secret>,
}

/// Resolves a model to its endpoint.
///
/// Most specific wins: the global `--base-url`/`--api-key` (applied to both models, as in
/// RouteLLM), then the model's own `base_url`/`api_key`, then the provider's environment
/// variables, then the config file's `providers` section, then the built-in default.
pub fn resolve(
    model: &ModelConfig,
    global: &GlobalOverrides,
    providers: &BTreeMap<String, ProviderConfig>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ResolvedModel, Error> {
    let name = model.name.trim();
    if name.is_empty() {
        return Err(Error::Config("a model name is empty".into()));
    }
    let split = name.split_once('/');
    if let Some((ECHO_PREFIX, rest)) = split {
        if rest.is_empty() {
            return Err(Error::Config(format!(
                "`{name}`: name the echo model, e.g. `echo/gpt-4o`"
            )));
        }
        return Ok(ResolvedModel {
            name: name.to_owned(),
            provider_model: rest.to_owned(),
            provider: ECHO_PREFIX.to_owned(),
            price: model.price_per_million_tokens,
            weight: model.weight.unwrap_or(1),
            endpoint: Endpoint::Echo,
        });
    }

    let custom = split.and_then(|(prefix, rest)| providers.get(prefix).map(|p| (prefix, rest, p)));
    let builtin = split.and_then(|(prefix, rest)| {
        BUILTIN
            .iter()
            .find(|provider| provider.prefixes.contains(&prefix))
            .map(|provider| (prefix, rest, provider))
    });
    // A name with an unknown prefix (`meta-llama/Llama-3-70b` on a vLLM behind --base-url)
    // is a model id in its own right, served by the OpenAI-compatible default.
    let openai = &BUILTIN[0];
    let (provider, provider_model, builtin) = match (custom, builtin) {
        (Some((prefix, rest, _)), builtin) => (prefix, rest, builtin.map(|(_, _, b)| b)),
        (None, Some((prefix, rest, provider))) => (prefix, rest, Some(provider)),
        (None, None) => ("openai", name, Some(openai)),
    };
    if provider_model.is_empty() {
        return Err(Error::Config(format!("`{name}` names a provider but no model")));
    }
    let file_provider = providers.get(provider);

    let base_url = global
        .base_url
        .clone()
        .or_else(|| model.base_url.clone())
        .or_else(|| builtin.and_then(|b| env(b.base_url_var)))
        .or_else(|| file_provider.and_then(|p| p.base_url.clone()))
        .or_else(|| builtin.map(|b| b.default_base_url.to_owned()))
        .ok_or_else(|| Error::Config(format!("provider `{provider}` of `{name}` has no base_url")))?;
    let api_key = global
        .api_key
        .clone()
        .or_else(|| model.api_key.clone())
        .or_else(|| {
            builtin
                .into_iter()
                .flat_map(|b| b.key_vars.iter())
                .find_map(|var| env(var))
                .map(Secret::new)
        })
        .or_else(|| {
            file_provider.and_then(|p| {
                p.api_key
                    .clone()
                    .or_else(|| p.api_key_env.as_deref().and_then(env).map(Secret::new))
            })
        })
        .filter(|key| !key.expose().is_empty());

    validate_base_url(name, &base_url)?;
    let headers = configured_headers(name, provider, file_provider, model, env)?;
    Ok(ResolvedModel {
        name: name.to_owned(),
        provider_model: provider_model.to_owned(),
        provider: provider.to_owned(),
        price: model.price_per_million_tokens,
        weight: model.weight.unwrap_or(1),
        endpoint: Endpoint::Http {
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            headers,
        },
    })
}

/// The model's configured extra headers over its provider's, environment references
/// expanded, each value marked sensitive.
fn configured_headers(
    name: &str,
    provider: &str,
    file_provider: Option<&ProviderConfig>,
    model: &ModelConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<HeaderMap, Error> {
    // Names first, values after: a provider's header the model replaces is never expanded,
    // so its `${VAR}` need not be set.
    let mut layered = match file_provider {
        Some(provider_config) => checked_names(&format!("providers.{provider}.headers"), &provider_config.headers)?,
        None => Vec::new(),
    };
    for own in checked_names(&format!("the headers of `{name}`"), &model.headers)? {
        layered.retain(|(earlier, _, _)| *earlier != own.0);
        layered.push(own);
    }
    expand_values(layered, env)
}

/// Configured headers as sent: names checked, `${VAR}` expanded, values sensitive. `key`
/// names the setting in error messages.
pub fn header_map(
    key: &str,
    headers: &BTreeMap<String, Secret>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<HeaderMap, Error> {
    expand_values(checked_names(key, headers)?, env)
}

/// Each configured header's checked name, the setting it came from (for messages), and its
/// value as written.
fn checked_names<'a>(
    key: &str,
    headers: &'a BTreeMap<String, Secret>,
) -> Result<Vec<(HeaderName, String, &'a Secret)>, Error> {
    headers
        .iter()
        .map(|(name, value)| {
            let name = config::header_name(key, name)?;
            let setting = format!("{key}: {name}");
            Ok((name, setting, value))
        })
        .collect()
}

fn expand_values(
    headers: Vec<(HeaderName, String, &Secret)>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<HeaderMap, Error> {
    headers
        .into_iter()
        .map(|(name, setting, value)| Ok((name, header_value(&setting, value, env)?)))
        .collect()
}

/// A configured header value with `${VAR}` expanded, marked sensitive (never logged).
fn header_value(key: &str, value: &Secret, env: &dyn Fn(&str) -> Option<String>) -> Result<HeaderValue, Error> {
    let expanded = expand_env(key, value.expose(), env)?;
    let mut value = HeaderValue::from_str(&expanded)
        .map_err(|_| Error::Config(format!("{key}: the value is not a valid header value")))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Replaces each `${VAR}` in a configured value with that environment variable, so the
/// file need not hold secrets. An unset variable is an error at start-up, not an empty
/// header on every request. Error messages never include the value.
pub(crate) fn expand_env(key: &str, value: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, Error> {
    let mut expanded = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        expanded.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| Error::Config(format!("{key}: `${{` without a closing `}}`")))?;
        let variable = &after[..end];
        let valid = variable
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && variable.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            // The text itself is not repeated: it may be a secret pasted in the wrong place.
            return Err(Error::Config(format!(
                "{key}: a `${{...}}` reference must name an environment variable (letters, digits, `_`)"
            )));
        }
        let found = env(variable)
            .ok_or_else(|| Error::Config(format!("{key}: the environment variable {variable} is not set")))?;
        expanded.push_str(&found);
        rest = &after[end + 1..];
    }
    expanded.push_str(rest);
    Ok(expanded)
}

fn validate_base_url(name: &str, base_url: &str) -> Result<(), Error> {
    let parsed = reqwest::Url::parse(base_url)
        .map_err(|error| Error::Config(format!("base URL `{base_url}` of `{name}`: {error}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Error::Config(format!(
            "base URL `{base_url}` of `{name}` must be http or https"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_endpoint_with_one_key_shares_stored_answers() {
        let env = |_: &str| None;
        let resolved = |yaml: &str| {
            let model: ModelConfig = serde_norway::from_str(yaml).unwrap();
            resolve(&model, &GlobalOverrides::default(), &BTreeMap::new(), &env).unwrap()
        };
        let a = resolved("{name: openai/gpt-4o, api_key: k1}");
        assert!(a.shares_storage_with(&resolved("{name: openai/gpt-4o-mini, api_key: k1}")));
        assert!(!a.shares_storage_with(&resolved("{name: openai/gpt-4o-mini, api_key: k2}")));
        assert!(!a.shares_storage_with(&resolved("{name: groq/llama3, api_key: k1}")));
        assert!(!a.shares_storage_with(&resolved(
            "{name: openai/x, api_key: k1, headers: {OpenAI-Project: p2}}"
        )));
        assert!(!a.shares_storage_with(&resolved("{name: echo/x}")));
        assert!(resolved("{name: echo/x}").shares_storage_with(&resolved("{name: echo/y}")));
    }

    fn model(name: &str) -> ModelConfig {
        ModelConfig {
            name: name.into(),
            base_url: None,
            api_key: None,
            headers: BTreeMap::new(),
            price_per_million_tokens: None,
            weight: None,
        }
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn http(resolved: &ResolvedModel) -> (&str, Option<&str>) {
        match &resolved.endpoint {
            Endpoint::Http { base_url, api_key, .. } => (base_url.as_str(), api_key.as_ref().map(Secret::expose)),
            Endpoint::Echo => panic!("expected http"),
        }
    }

    #[test]
    fn bare_and_openai_prefixed_names_use_openai() {
        for name in ["gpt-4o", "openai/gpt-4o"] {
            let resolved = resolve(&model(name), &GlobalOverrides::default(), &BTreeMap::new(), &no_env).unwrap();
            assert_eq!(resolved.provider_model, "gpt-4o");
            assert_eq!(http(&resolved), ("https://api.openai.com/v1", None));
        }
    }

    #[test]
    fn provider_prefix_picks_endpoint_and_key_variable() {
        let env = |var: &str| (var == "TOGETHERAI_API_KEY").then(|| "tk".to_owned());
        let resolved = resolve(
            &model("together_ai/mistralai/Mixtral-8x7B-Instruct-v0.1"),
            &GlobalOverrides::default(),
            &BTreeMap::new(),
            &env,
        )
        .unwrap();
        assert_eq!(resolved.provider_model, "mistralai/Mixtral-8x7B-Instruct-v0.1");
        assert_eq!(http(&resolved), ("https://api.together.xyz/v1", Some("tk")));

        let env = |var: &str| match var {
            "ANTHROPIC_API_KEY" => Some("ak".to_owned()),
            "GOOGLE_API_KEY" => Some("gk".to_owned()),
            _ => None,
        };
        let resolved = |name: &str| resolve(&model(name), &GlobalOverrides::default(), &BTreeMap::new(), &env).unwrap();
        let claude = resolved("anthropic/claude-sonnet-4-5");
        assert_eq!(claude.provider_model, "claude-sonnet-4-5");
        assert_eq!(http(&claude), ("https://api.anthropic.com/v1", Some("ak")));
        let gemini = resolved("gemini/gemini-2.5-flash");
        assert_eq!(gemini.provider_model, "gemini-2.5-flash");
        assert_eq!(
            http(&gemini),
            ("https://generativelanguage.googleapis.com/v1beta/openai", Some("gk"))
        );
    }

    #[test]
    fn every_required_prefix_is_known() {
        for prefix in [
            "anthropic",
            "gemini",
            "together",
            "groq",
            "fireworks_ai",
            "deepinfra",
            "mistral",
            "openrouter",
            "anyscale",
            "ollama",
            "vllm",
        ] {
            let resolved = resolve(
                &model(&format!("{prefix}/some-model")),
                &GlobalOverrides::default(),
                &BTreeMap::new(),
                &no_env,
            )
            .unwrap();
            assert_eq!(resolved.provider_model, "some-model", "{prefix}");
            assert_ne!(http(&resolved).0, "https://api.openai.com/v1", "{prefix}");
        }
        let ollama = resolve(
            &model("ollama/llama3"),
            &GlobalOverrides::default(),
            &BTreeMap::new(),
            &no_env,
        )
        .unwrap();
        assert_eq!(http(&ollama).0, "http://localhost:11434/v1");
    }

    #[test]
    fn base_url_variable_overrides_default_and_global_overrides_all() {
        let env = |var: &str| (var == "OPENAI_BASE_URL").then(|| "http://127.0.0.1:9/v1/".to_owned());
        let resolved = resolve(&model("gpt-4o"), &GlobalOverrides::default(), &BTreeMap::new(), &env).unwrap();
        assert_eq!(http(&resolved).0, "http://127.0.0.1:9/v1");
        let global = GlobalOverrides {
            base_url: Some("http://10.0.0.1/v1".into()),
            api_key: Some(Secret::new("g".into())),
        };
        let mut own = model("gpt-4o");
        own.base_url = Some("http://own/v1".into());
        let resolved = resolve(&own, &global, &BTreeMap::new(), &env).unwrap();
        assert_eq!(http(&resolved), ("http://10.0.0.1/v1", Some("g")));
    }

    #[test]
    fn custom_provider_from_config() {
        let mut providers = BTreeMap::new();
        providers.insert(
            "acme".to_owned(),
            ProviderConfig {
                base_url: Some("https://llm.acme.test/v1".into()),
                api_key: None,
                api_key_env: Some("ACME_KEY".into()),
                headers: BTreeMap::new(),
            },
        );
        let env = |var: &str| (var == "ACME_KEY").then(|| "secret".to_owned());
        let resolved = resolve(&model("acme/big"), &GlobalOverrides::default(), &providers, &env).unwrap();
        assert_eq!(resolved.provider, "acme");
        assert_eq!(http(&resolved), ("https://llm.acme.test/v1", Some("secret")));
    }

    fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, Secret> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), Secret::new((*value).to_owned())))
            .collect()
    }

    fn resolve_headers(
        provider_headers: &[(&str, &str)],
        model_headers: &[(&str, &str)],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<HeaderMap, Error> {
        let providers = BTreeMap::from([(
            "openrouter".to_owned(),
            ProviderConfig {
                headers: headers(provider_headers),
                ..ProviderConfig::default()
            },
        )]);
        let mut own = model("openrouter/meta-llama/llama-3-8b");
        own.headers = headers(model_headers);
        let resolved = resolve(&own, &GlobalOverrides::default(), &providers, env)?;
        match resolved.endpoint {
            Endpoint::Http { headers, .. } => Ok(headers),
            Endpoint::Echo => panic!("expected http"),
        }
    }

    #[test]
    fn configured_headers_layer_model_over_provider_and_read_the_environment() {
        let env = |var: &str| (var == "GATEWAY_KEY").then(|| "gk-123".to_owned());
        let resolved = resolve_headers(
            &[("X-Title", "our app"), ("Helicone-Auth", "Bearer ${GATEWAY_KEY}")],
            &[
                ("x-title", "the model's own title"),
                ("X-Both", "${GATEWAY_KEY}/${GATEWAY_KEY}$"),
            ],
            &env,
        )
        .unwrap();
        let value = |name: &str| {
            let found: Vec<&HeaderValue> = resolved.get_all(name).iter().collect();
            assert_eq!(found.len(), 1, "{name}: {resolved:?}");
            found[0].to_str().unwrap().to_owned()
        };
        assert_eq!(value("x-title"), "the model's own title");
        assert_eq!(value("helicone-auth"), "Bearer gk-123");
        assert_eq!(value("x-both"), "gk-123/gk-123$");
        assert!(resolved.iter().all(|(_, value)| value.is_sensitive()));
        assert!(!format!("{resolved:?}").contains("gk-123"), "values stay out of logs");
    }

    #[test]
    fn configured_headers_refuse_what_the_proxy_sets_and_unset_variables() {
        let failure = |provider: &[(&str, &str)], own: &[(&str, &str)]| {
            resolve_headers(provider, own, &no_env).unwrap_err().to_string()
        };
        let error = failure(&[("Authorization", "Bearer x")], &[]);
        assert!(
            error.contains("providers.openrouter.headers") && error.contains("api_key"),
            "{error}"
        );
        let error = failure(&[], &[("Content-Length", "3")]);
        assert!(error.contains("cannot be set"), "{error}");
        let error = failure(&[], &[("bad header", "x")]);
        assert!(error.contains("not a valid header name"), "{error}");
        let error = failure(&[("X-Key", "Bearer ${MISSING_KEY}")], &[]);
        assert!(error.contains("MISSING_KEY is not set"), "{error}");
        // A provider's header the model replaces is never read, so its variable need not exist.
        let replaced = resolve_headers(&[("X-Key", "Bearer ${MISSING_KEY}")], &[("x-key", "own")], &no_env).unwrap();
        assert_eq!(replaced["x-key"], "own");
        let error = failure(&[], &[("X-Key", "${sk-pasted-secret}")]);
        assert!(error.contains("must name an environment variable"), "{error}");
        assert!(!error.contains("sk-pasted-secret"), "{error}");
        let error = failure(&[], &[("X-Key", "${UNCLOSED")]);
        assert!(error.contains("without a closing"), "{error}");
        let error = failure(&[], &[("X-Key", "line\nbreak\n")]);
        assert!(error.contains("not a valid header value"), "{error}");
    }

    #[test]
    fn a_remote_model_without_a_key_is_reported_at_start_up() {
        let resolve_with = |name: &str, env: &dyn Fn(&str) -> Option<String>| {
            resolve(&model(name), &GlobalOverrides::default(), &BTreeMap::new(), env).unwrap()
        };
        let warning = resolve_with("groq/llama3-8b-8192", &no_env)
            .missing_key_warning()
            .unwrap();
        assert!(
            warning.contains("groq/llama3-8b-8192") && warning.contains("groq"),
            "{warning}"
        );
        let keyed = |var: &str| (var == "GROQ_API_KEY").then(|| "gsk".to_owned());
        assert_eq!(resolve_with("groq/llama3-8b-8192", &keyed).missing_key_warning(), None);
        assert_eq!(
            resolve_with("ollama/llama3", &no_env).missing_key_warning(),
            None,
            "local"
        );
        assert_eq!(resolve_with("echo/gpt-4o", &no_env).missing_key_warning(), None);

        // A key configured as a header (Azure's `api-key`) is a key; a title header is not.
        let with_headers = |pairs: &[(&str, &str)]| {
            let providers = BTreeMap::from([(
                "azure".to_owned(),
                ProviderConfig {
                    base_url: Some("https://res.openai.azure.com/openai/v1".into()),
                    headers: headers(pairs),
                    ..ProviderConfig::default()
                },
            )]);
            resolve(&model("azure/gpt-4o"), &GlobalOverrides::default(), &providers, &no_env).unwrap()
        };
        assert_eq!(with_headers(&[("api-key", "k")]).missing_key_warning(), None);
        assert!(with_headers(&[("X-Title", "t")]).missing_key_warning().is_some());
    }

    #[test]
    fn unknown_prefix_is_a_model_id() {
        let resolved = resolve(
            &model("meta-llama/Llama-3-70b"),
            &GlobalOverrides::default(),
            &BTreeMap::new(),
            &no_env,
        )
        .unwrap();
        assert_eq!(resolved.provider_model, "meta-llama/Llama-3-70b");
        assert_eq!(resolved.provider, "openai");
    }

    #[test]
    fn echo_is_offline() {
        let resolved = resolve(
            &model("echo/strong"),
            &GlobalOverrides::default(),
            &BTreeMap::new(),
            &no_env,
        )
        .unwrap();
        assert_eq!(resolved.endpoint, Endpoint::Echo);
        assert_eq!(resolved.provider_model, "strong");
    }

    #[test]
    fn bad_names_and_urls_are_config_errors() {
        for name in ["", "echo/", "groq/"] {
            assert!(
                resolve(&model(name), &GlobalOverrides::default(), &BTreeMap::new(), &no_env).is_err(),
                "{name}"
            );
        }
        let global = GlobalOverrides {
            base_url: Some("ftp://x".into()),
            api_key: None,
        };
        assert!(resolve(&model("gpt-4o"), &global, &BTreeMap::new(), &no_env).is_err());
    }
}
