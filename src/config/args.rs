//! pmkvqd's command line. Named flags exist for what operators set most; `--set KEY=VALUE` reaches every key.

use super::key_def;
use clap::Parser;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "pmkvqd",
    version,
    about = "pmkvq daemon: streams LLM tokens over gRPC (and OpenAI-compatible HTTP) with a PM-KVQ KV cache",
    after_help = "Every key can also be set in the config file (--config) or as PMKVQ_<SECTION>_<KEY> in the \
                  environment; flags win over the environment, which wins over the file. \
                  `--print-config` shows each effective value and where it came from."
)]
pub struct DaemonArgs {
    /// TOML config file (also PMKVQ_CONFIG).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Model to serve (GGUF file or HF safetensors directory). Key `model`.
    #[arg(long, value_name = "PATH")]
    pub model: Option<String>,
    /// gRPC listen address. Key `listen`.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// OpenAI-compatible HTTP API address ("" = off). Key `http.listen`.
    #[arg(long, value_name = "HOST:PORT")]
    pub http_listen: Option<String>,
    /// Calibration profile: a path, `none` or `auto`. Key `profile`.
    #[arg(long, value_name = "FILE")]
    pub profile: Option<String>,
    /// Compute threads (0 = all cores). Key `threads`.
    #[arg(long)]
    pub threads: Option<String>,
    /// cpu, auto or cuda:N. Key `device`.
    #[arg(long)]
    pub device: Option<String>,
    /// `pretty` or `json`. Key `log.format`.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Default KV method. Key `engine.kv_method`.
    #[arg(long)]
    pub kv_method: Option<String>,
    /// Set any key, e.g. `--set engine.max_running=4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print the effective configuration (with each value's source) and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl DaemonArgs {
    /// (key, value, flag as written) for every flag given, in order; malformed `--set` go to `errors`.
    pub(super) fn overrides(&self, errors: &mut Vec<String>) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        let named = [
            ("model", &self.model, "--model"),
            ("listen", &self.listen, "--listen"),
            ("http.listen", &self.http_listen, "--http-listen"),
            ("profile", &self.profile, "--profile"),
            ("threads", &self.threads, "--threads"),
            ("device", &self.device, "--device"),
            ("log.format", &self.log_format, "--log-format"),
            ("engine.kv_method", &self.kv_method, "--kv-method"),
        ];
        for (key, v, flag) in named {
            if let Some(v) = v {
                out.push((key.to_string(), v.clone(), flag.to_string()));
            }
        }
        for s in &self.set {
            match s.split_once('=') {
                Some((k, v)) if key_def(k.trim()).is_some() => {
                    out.push((k.trim().to_string(), v.to_string(), format!("--set {}", k.trim())))
                }
                Some((k, _)) => errors.push(format!("unknown key `{}` (from flag --set)", k.trim())),
                None => errors.push(format!("`--set` takes KEY=VALUE, got `{s}`")),
            }
        }
        out
    }
}
