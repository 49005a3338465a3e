//! `config.example.toml`: it documents every key, with its default.

use super::*;

/// `config.example.toml` documents every key with its default: parsed,
/// it must equal the defaults exactly.
#[test]
fn example_file_is_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let parsed = Config::from_file(&path).expect("config.example.toml parses");
    assert_eq!(parsed, Config::default());
    let text = std::fs::read_to_string(&path).expect("readable");
    for key in [
        "listen",
        "max_connections",
        "max_execution_time",
        "heartbeat",
        "heartbeat_event",
        "retry",
        "history",
        "request_timeout",
        "write_timeout",
        "max_body",
        "stack_size",
        "cors_origins",
        "overload",
        "overload_retry",
        "ticket_session",
        "data_dir",
        "max_streams_per_client",
        "publish_rate",
        "trusted_proxies",
        "publish_token",
        "subscribe_token",
        "admin_token",
        "anonymous",
        "jwt_secret",
        "jwt_public_key",
        "jwt_algorithms",
        "jwt_issuer",
        "jwt_audience",
        "jwt_cookie",
        "[redis]",
        "[mercure]",
        "subscriptions",
        "[[postgres]]",
        "channels",
    ] {
        assert!(
            text.contains(key),
            "config.example.toml does not document {key}"
        );
    }
}
