//! Measures what a replay by selector costs: a hub holding 5 events of
//! each of 20,000 topics, then subscribers by `*` and by URI templates
//! resuming from the first id, and one resuming from an id no event
//! carries. Prints the time of each subscribe and of reading its replay.
//!
//! ```text
//! cargo run --release --example replay_by_selector
//! ```

use std::time::Instant;

use ssed::hub::{Privacy, Selector};
use ssed::{Event, Hub};

const TOPICS: usize = 20_000;
const ROUNDS: usize = 5;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let hub = Hub::new(ROUNDS);
    let started = Instant::now();
    let mut first = None;
    for _ in 0..ROUNDS {
        for i in 0..TOPICS {
            let p = hub.publish(&format!("/t/{i}"), Event::new().data("x".repeat(100)))?;
            first.get_or_insert(p.id);
        }
    }
    println!(
        "published {} events on {TOPICS} topics in {:?}",
        TOPICS * ROUNDS,
        started.elapsed()
    );
    let first = first.map(|id| id.to_string()).unwrap_or_default();
    let cases = [
        ("`*`", Selector::All, first.as_str()),
        ("/t/{n}", Selector::parse("/t/{n}")?, &first),
        ("/t/1{n}9", Selector::parse("/t/1{n}9")?, &first),
        (
            "`*` from an unknown id",
            Selector::All,
            "no-event-has-this-id",
        ),
    ];
    for (name, selector, from) in cases {
        let t = Instant::now();
        let mut sub = hub.subscribe_matching(&[], &[selector], &Privacy::Public, Some(from))?;
        let subscribed = t.elapsed();
        let t = Instant::now();
        let frames = sub.take_backlog().len();
        println!(
            "{name}: subscribe {subscribed:?}, replay of {frames} frames {:?}",
            t.elapsed()
        );
    }
    Ok(())
}
