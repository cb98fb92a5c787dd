//! A config file, as YAML, through validation and model resolution (headers with
//! `${VAR}` references included): errors are fine, panics are not.
#![no_main]
use libfuzzer_sys::fuzz_target;
use routellm::config::{Config, FileConfig, Overrides};
use routellm::providers;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(file) = FileConfig::from_yaml(text) else { return };
    let Ok(config) = Config::merge(file, Overrides::default()) else {
        return;
    };
    let env = |name: &str| (name.len() % 2 == 0).then(|| format!("value-of-{name}"));
    for model in [&config.strong_model, &config.weak_model] {
        let _ = providers::resolve(model, &config.global, &config.providers, &env);
    }
});
