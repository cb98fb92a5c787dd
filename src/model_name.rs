//! Parsing the `model` field: `router-<name>-<threshold>` or a configured model's name.

use crate::error::Error;

/// What a request's `model` asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModelTarget<'a> {
    /// `router-<name>[-<threshold>]`: score the prompt with `router` and compare to `threshold`
    /// (`None`: the router's configured default threshold).
    Routed { router: &'a str, threshold: Option<f64> },
    /// Any other name: forwarded to the configured model of that name, without routing.
    Direct(&'a str),
}

const PREFIX: &str = "router-";

/// Splits a model name into its router and threshold.
///
/// Router names use `_` (`sw_ranking`), never `-`, so the first `-` after the prefix ends
/// the name and everything after it is the threshold, which may itself hold a `-` (`1e-3`).
pub fn parse(model: &str) -> Result<ModelTarget<'_>, Error> {
    let Some(rest) = model.strip_prefix(PREFIX) else {
        return Ok(ModelTarget::Direct(model));
    };
    let (router, threshold) = match rest.split_once('-') {
        Some((router, threshold)) => (router, Some(threshold)),
        None => (rest, None),
    };
    if router.is_empty() {
        return Err(malformed(model, "the router name is empty"));
    }
    let threshold = threshold
        .map(|text| parse_threshold(text).map_err(|why| malformed(model, &why)))
        .transpose()?;
    Ok(ModelTarget::Routed { router, threshold })
}

fn parse_threshold(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("the threshold `{text}` is not a number"))?;
    if !value.is_finite() || !(0.0..=1.0).contains(&value) {
        return Err(format!("the threshold `{text}` is outside [0, 1]"));
    }
    Ok(value)
}

fn malformed(model: &str, why: &str) -> Error {
    Error::InvalidRequest {
        message: format!(
            "Invalid model `{model}`: {why}. Use `router-<router>-<threshold>` with a threshold in [0, 1], \
             e.g. `router-mf-0.116`, or the name of a configured model."
        ),
        param: Some("model"),
        code: Some("invalid_model"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(router: &str, threshold: Option<f64>) -> ModelTarget<'_> {
        ModelTarget::Routed { router, threshold }
    }

    #[test]
    fn parses_router_and_threshold() {
        assert_eq!(parse("router-mf-0.116").unwrap(), routed("mf", Some(0.116)));
        assert_eq!(parse("router-sw_ranking-0.5").unwrap(), routed("sw_ranking", Some(0.5)));
        assert_eq!(parse("router-random-1").unwrap(), routed("random", Some(1.0)));
        assert_eq!(parse("router-random-0").unwrap(), routed("random", Some(0.0)));
    }

    #[test]
    fn scientific_notation_keeps_its_minus() {
        assert_eq!(parse("router-mf-1e-3").unwrap(), routed("mf", Some(0.001)));
        assert_eq!(parse("router-bert-2.5E-1").unwrap(), routed("bert", Some(0.25)));
    }

    #[test]
    fn missing_threshold_means_default() {
        assert_eq!(parse("router-mf").unwrap(), routed("mf", None));
    }

    #[test]
    fn other_names_are_direct() {
        assert_eq!(parse("gpt-4o").unwrap(), ModelTarget::Direct("gpt-4o"));
        assert_eq!(parse("routerx-mf-0.5").unwrap(), ModelTarget::Direct("routerx-mf-0.5"));
    }

    #[test]
    fn bad_thresholds_are_400_with_explanations() {
        for (model, fragment) in [
            ("router-mf-abc", "not a number"),
            ("router-mf-1.5", "outside [0, 1]"),
            ("router-mf--0.1", "outside [0, 1]"),
            ("router-mf-nan", "outside [0, 1]"),
            ("router-mf-inf", "outside [0, 1]"),
            ("router-mf-", "not a number"),
            ("router--0.5", "router name is empty"),
            ("router-", "router name is empty"),
        ] {
            let error = parse(model).unwrap_err();
            assert_eq!(error.status(), axum::http::StatusCode::BAD_REQUEST, "{model}");
            let message = error.to_string();
            assert!(message.contains(fragment), "{model}: {message}");
            assert!(message.contains("router-<router>-<threshold>"), "{message}");
        }
    }
}
