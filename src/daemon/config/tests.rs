//! The loader's own tests: values, errors naming key and file, the environment.

use super::*;

fn err(text: &str) -> String {
    Config::from_toml(text, Some(Path::new("ssed.toml")))
        .expect_err(text)
        .to_string()
}

#[test]
fn durations() {
    let table = [
        ("0", Some(0)),
        ("250ms", Some(250)),
        ("30s", Some(30_000)),
        ("5m", Some(300_000)),
        ("1h", Some(3_600_000)),
        ("fast", None),
        ("10", None),
        ("s", None),
        ("-1s", None),
        ("1.5s", None),
        ("1d", None),
        ("", None),
    ];
    for (text, ms) in table {
        assert_eq!(
            parse_duration(text).ok().map(|d| d.as_millis() as u64),
            ms,
            "{text:?}"
        );
    }
}

#[test]
fn defaults_and_overrides() {
    let c = Config::from_toml("", None).expect("empty is defaults");
    assert_eq!(c, Config::default());
    let c = Config::from_toml(
        r#"
        listen = "0.0.0.0:9000"
        max_connections = 10
        heartbeat = "0"
        heartbeat_event = true
        cors_origins = ["https://a.example"]
        overload = "retry"
        overload_retry = ["1s", "2s"]
        [auth]
        publish_token = "p"
        admin_token = "operator-secret"
        [[postgres]]
        url = "postgres://x@127.0.0.1/db"
        channels = ["a", "b"]
        "#,
        None,
    )
    .expect("valid");
    assert_eq!(c.listen, "0.0.0.0:9000");
    assert_eq!(c.max_connections, Some(10));
    assert_eq!(c.heartbeat, Duration::ZERO);
    assert!(c.heartbeat_event);
    assert_eq!(c.overload, OverloadMode::Retry);
    assert_eq!(
        c.overload_retry,
        (Duration::from_secs(1), Duration::from_secs(2))
    );
    assert_eq!(c.publish_token.as_deref(), Some("p"));
    assert_eq!(c.postgres[0].channels, ["a", "b"]);
    assert_eq!(c.postgres[0].topic, None);
    assert_eq!(
        c.postgres[0].routes(),
        [("a".into(), "a".into()), ("b".into(), "b".into())]
    );
    assert_eq!(c.admin_token.as_deref(), Some("operator-secret"));
    let shown = format!("{c:?}");
    assert!(!shown.contains("\"p\""), "tokens are redacted");
    assert!(!shown.contains("operator-secret"), "{shown}");
    assert!(shown.contains("admin_token: Some(\"<set>\")"), "{shown}");
}

#[test]
fn errors_name_the_key_and_the_file() {
    let table = [
        (
            "heartbeat = \"fast\"",
            "key `heartbeat`: invalid duration \"fast\"",
        ),
        ("nope = 1", "key `nope`: unknown key"),
        (
            "\"host=127.0.0.1 user=u\" = 1",
            "key `\"host=127.0.0.1 user=u\"`: unknown key",
        ),
        ("[redis]\n\"a.b\" = 1", "key `redis.\"a.b\"`: unknown key"),
        (
            "max_connections = \"many\"",
            "key `max_connections`: expected an integer, found string",
        ),
        (
            "max_connections = -1",
            "key `max_connections`: -1 is out of range",
        ),
        ("history = true", "key `history`: expected an integer"),
        (
            "overload = \"drop\"",
            "key `overload`: expected \"503\" or \"retry\"",
        ),
        (
            "max_streams_per_client = -3",
            "key `max_streams_per_client`: -3 is out of range",
        ),
        (
            "publish_rate = \"fast\"",
            "key `publish_rate`: \"fast\" is not a rate",
        ),
        (
            "publish_rate = \"0/s\"",
            "key `publish_rate`: \"0/s\": a rate of 0 would refuse everything",
        ),
        (
            "trusted_proxies = [\"10.0.0.0/40\"]",
            "key `trusted_proxies`: \"10.0.0.0/40\" is not an IP address or network",
        ),
        (
            "trusted_proxies = \"127.0.0.1\"",
            "key `trusted_proxies`: expected an array of strings",
        ),
        (
            "overload_retry = [\"5s\"]",
            "key `overload_retry`: expected two durations",
        ),
        ("listen = \"nowhere\"", "key `listen`: expected host:port"),
        (
            "stack_size = 1024",
            "key `stack_size`: 1024 is out of range",
        ),
        (
            "write_timeout = \"0\"",
            "key `write_timeout`: must be greater than zero",
        ),
        ("[auth]\ntoken = \"x\"", "key `auth.token`: unknown key"),
        (
            "[mercure]\nsubscription = true",
            "key `mercure.subscription`: unknown key",
        ),
        (
            "[mercure]\nsubscriptions = \"yes\"",
            "key `mercure.subscriptions`: expected",
        ),
        (
            "[[postgres]]\nchannels = [\"a\"]",
            "key `postgres[0].url`: missing",
        ),
        (
            "[[postgres]]\nurl = \"postgres://u@h:port/db\"\nchannels = [\"a\"]",
            "key `postgres[0].url`: invalid connection string",
        ),
        (
            "[[postgres]]\nurl = \"postgres://u@h/db\"",
            "key `postgres[0].channels`: missing",
        ),
        (
            "[[postgres]]\nurl = \"postgres://u@h/db\"\nchannels = [\"a b\"]",
            "key `postgres[0].channels`: channel \"a b\" is not a valid topic name",
        ),
        (
            "[[postgres]]\nurl = \"postgres://u@h/db\"\nchannels = [\"a\"]\ntopic = \"a/b\"",
            "key `postgres[0].topic`: invalid topic name \"a/b\"",
        ),
        (
            "[[postgres]]\nurl = \"postgres://u@h/db\"\nchannels = [\"a\"]\ntopic = 1",
            "key `postgres[0].topic`: expected a string",
        ),
        (
            "[[postgres]]\nurl = \"postgres://u@h/db\"\nchannels = [\"a\"]\n\
             [[postgres]]\nurl = \"postgres://u@h/db\"\nchannels = [\"\"]\ntopic = \"t\"",
            "key `postgres[1].channels`: invalid channel \"\"",
        ),
    ];
    for (text, want) in table {
        let got = err(text);
        assert!(got.starts_with("config file ssed.toml: "), "{got}");
        assert!(got.contains(want), "{text:?}: {got}");
    }
    assert!(err("listen = ").contains("invalid TOML"));
}

#[test]
fn postgres_topic_maps_every_channel() {
    let c = Config::from_toml(
        r#"
        [[postgres]]
        url = "postgres://app:s3cret@127.0.0.1/db"
        channels = ["user updates", "Orders"]
        topic = "changes"
        "#,
        None,
    )
    .expect("valid: a topic frees channels from topic-name rules");
    let pg = &c.postgres[0];
    assert_eq!(pg.topic.as_deref(), Some("changes"));
    assert_eq!(
        pg.routes(),
        [
            ("user updates".into(), "changes".into()),
            ("Orders".into(), "changes".into())
        ]
    );
    let shown = format!("{c:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(
        shown.contains("postgres://app@127.0.0.1:5432/db"),
        "{shown}"
    );
}

#[test]
fn env_overrides_tokens() {
    let mut c = Config::from_toml("[auth]\npublish_token = \"file\"", None).expect("valid");
    c.apply_env_from(|k| match k {
        ENV_PUBLISH_TOKEN => Some("env".into()),
        ENV_SUBSCRIBE_TOKEN => Some(String::new()),
        ENV_ADMIN_TOKEN => Some("env-admin".into()),
        _ => None,
    });
    assert_eq!(c.publish_token.as_deref(), Some("env"));
    assert_eq!(c.admin_token.as_deref(), Some("env-admin"));
    assert_eq!(c.subscribe_token, None, "an empty variable is no token");
}

#[test]
fn redis_url_is_checked_and_excludes_data_dir() {
    let c = Config::from_toml(
        "[redis]\nurl = \"redis://:pw@127.0.0.1:6380/2\"",
        Some(Path::new("ssed.toml")),
    )
    .expect("a good URL");
    assert_eq!(c.redis_url.as_deref(), Some("redis://:pw@127.0.0.1:6380/2"));
    for (text, want) in [
        ("[redis]\nurl = \"http://h\"", "starts with redis://"),
        ("[redis]\nurl = \"redis://h:port\"", "port \"port\""),
        ("[redis]\nurl = \"redis://:secret@h/x\"", "database \"x\""),
        (
            "data_dir = \"/tmp/x\"\n[redis]\nurl = \"redis://h\"",
            "together with data_dir",
        ),
    ] {
        let e = Config::from_toml(text, Some(Path::new("ssed.toml")))
            .expect_err(text)
            .to_string();
        assert!(e.contains("ssed.toml"), "{e}");
        assert!(e.contains("redis.url"), "{e}");
        assert!(e.contains(want), "{text}: {e}");
        assert!(!e.contains("secret"), "{e}");
    }
}

#[test]
fn mercure_subscriptions_is_off_unless_asked_for() {
    assert!(!Config::default().mercure_subscriptions);
    let c = Config::from_toml("[mercure]\nsubscriptions = true", None).expect("parses");
    assert!(c.mercure_subscriptions);
    let e = Config::from_toml("[mercure]\nhub = 1", Some(Path::new("/etc/ssed.toml")))
        .expect_err("unknown key")
        .to_string();
    assert!(
        e.contains("/etc/ssed.toml") && e.contains("mercure.hub"),
        "{e}"
    );
}
