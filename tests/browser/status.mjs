// The ssed status page in headless Chromium, run by tests/browser.rs (or
// by hand against a running `ssed`):
//
//     SSED_PID=1234 node tests/browser/status.mjs http://127.0.0.1:8080/status target/tmp/status.png
//
// Opens the page on a phone-sized screen with every request elsewhere
// refused, and, while it runs, opens streams, publishes events and closes
// the streams again. Meanwhile a stream of its own on /status/events keeps
// every status event by id (the witness). It checks that:
//
// - each chart draws the figures of the event the page last got, as the
//   witness got them (`data-values` of every polyline, `data-value` of
//   every figure), and draws them where its scale says (the last point of
//   each polyline);
// - the charts moved with the load: streams, published and delivered per
//   second, client disconnects;
// - the figures agree with /metrics (published total, client disconnects)
//   and with /proc/PID/status (threads, RSS);
// - the page asked for nothing from elsewhere, threw nothing and fits a
//   375 px wide screen.
//
// Saves a screenshot at a desktop size to the given path (and one of the
// phone screen beside it, `-phone.png`), on failure too. Exits 0 on
// success, 1 on failure, 2 on bad arguments.
//
// Environment: CHROMIUM (default /usr/bin/chromium), SSED_PID (the
// server's, for /proc; without it those checks are skipped),
// STATUS_TIMEOUT_MS (overall limit, default 30000).

import http from "node:http";
import { readFileSync } from "node:fs";
import { harness, launch } from "./harness.mjs";

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot || process.argv.length > 4) {
  console.error("usage: node status.mjs STATUS_PAGE_URL SCREENSHOT_PATH");
  process.exit(2);
}
const timeoutMs = Number(process.env.STATUS_TIMEOUT_MS) || 30000;
const pid = process.env.SSED_PID;
const origin = new URL(url).origin;
const { hostname, port } = new URL(url);
const STREAMS = 12;
const PUBLISH_EVERY_MS = 40;
const PUBLISH_FOR_MS = 3000;

const { log, run, fail, state } = harness("status", screenshot, timeoutMs);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Opens an event stream on `path`; `onFrame({event, id, data})` per frame. */
function stream(path, onFrame = () => {}) {
  return new Promise((resolve, reject) => {
    const req = http.get({ hostname, port, path, agent: false, headers: { Accept: "text/event-stream" } }, (res) => {
      if (res.statusCode !== 200) {
        reject(new Error(`GET ${path} answered ${res.statusCode}`));
        res.resume();
        return;
      }
      let buf = "";
      res.setEncoding("utf8");
      res.on("data", (chunk) => {
        buf += chunk;
        let end;
        while ((end = buf.indexOf("\n\n")) >= 0) {
          const frame = { event: "message", id: "", data: [] };
          for (const line of buf.slice(0, end).split("\n")) {
            const [k, ...rest] = line.split(":");
            const v = rest.join(":").replace(/^ /, "");
            if (k === "event") frame.event = v;
            else if (k === "id") frame.id = v;
            else if (k === "data") frame.data.push(v);
          }
          buf = buf.slice(end + 2);
          onFrame({ ...frame, data: frame.data.join("\n") });
        }
      });
      res.on("error", () => {});
      resolve(req);
    });
    req.on("error", (e) => (req.destroyed ? undefined : reject(e)));
  });
}

async function metrics() {
  const text = await (await fetch(`${origin}/metrics`)).text();
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const at = line.lastIndexOf(" ");
    out[line.slice(0, at)] = Number(line.slice(at + 1));
  }
  return out;
}

function procStatus(field) {
  if (!pid) return undefined;
  const m = new RegExp(`^${field}:\\s+(\\d+)`, "m").exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return m ? Number(m[1]) : undefined;
}

// What the page draws, as the DOM says.
function drawn() {
  const charts = {};
  for (const svg of document.querySelectorAll("svg[id^=chart-]")) {
    const box = svg.getBoundingClientRect();
    const lines = {};
    for (const p of svg.querySelectorAll("polyline")) {
      const pts = Array.from({ length: p.points.numberOfItems }, (_, i) => [p.points.getItem(i).x, p.points.getItem(i).y]);
      lines[p.dataset.series] = { values: p.dataset.values.split(",").map(Number), last: pts[pts.length - 1], count: pts.length };
    }
    charts[svg.id] = { max: Number(svg.dataset.max), samples: Number(svg.dataset.samples), lines, width: box.width, height: box.height };
  }
  const figure = (id) => document.getElementById(id)?.dataset.value;
  const reasons = {};
  for (const s of document.querySelectorAll("#reasons [data-reason]")) reasons[s.dataset.reason] = Number(s.dataset.value);
  return {
    lastId: document.body.dataset.lastId ?? "",
    state: document.getElementById("state").textContent,
    charts,
    reasons,
    figures: Object.fromEntries(["now-streams", "cap", "rejected", "now-published", "published-total", "now-delivered", "delivered-total", "now-rss", "now-threads"].map((id) => [id, Number(figure(id))])),
    scrollWidth: document.documentElement.scrollWidth,
  };
}

// The status event's figure each chart line draws.
const LINES = {
  "chart-streams": { streams: (f) => f.streams_open, cap: (f) => f.max_connections },
  "chart-published": { published: (f) => f.published_per_second },
  "chart-delivered": { delivered: (f) => f.delivered_per_second },
  "chart-disconnects": Object.fromEntries(
    ["client", "write_timeout", "budget", "shutdown", "slow", "expired"].map((r) => [r, (f) => f.disconnects_per_second[r]]),
  ),
  "chart-rss": { rss: (f) => f.rss_bytes },
  "chart-threads": { threads: (f) => f.threads },
};
const FIGURES = {
  "now-streams": (f) => f.streams_open,
  cap: (f) => f.max_connections,
  rejected: (f) => f.rejected_total,
  "now-published": (f) => f.published_per_second,
  "published-total": (f) => f.published_total,
  "now-delivered": (f) => f.delivered_per_second,
  "delivered-total": (f) => f.delivered_total,
  "now-rss": (f) => f.rss_bytes,
  "now-threads": (f) => f.threads,
};

// The witness: every status event by id.
const witness = new Map();
const witnessReq = await run("opening the witness stream on /status/events", () =>
  stream("/status/events", (f) => {
    if (f.event === "status") witness.set(f.id, JSON.parse(f.data));
  }),
);

/** Checks one look at the page against the witness; returns the figures it drew. */
async function check(seen, when) {
  const f = await run(`waiting for the witness to have event ${seen.lastId} (${when})`, async () => {
    for (let i = 0; i < 40 && !witness.has(seen.lastId); i++) await sleep(50);
    const f = witness.get(seen.lastId);
    if (!f) throw new Error(`the witness never got event ${JSON.stringify(seen.lastId)}`);
    return f;
  });
  for (const [chart, lines] of Object.entries(LINES)) {
    const c = seen.charts[chart];
    if (!c) await fail(`${when}: no ${chart}`);
    for (const [series, figure] of Object.entries(lines)) {
      const line = c.lines[series];
      if (!line) {
        if (series === "cap") continue; // drawn only near the cap
        await fail(`${when}: ${chart} has no ${series} line`);
      }
      const last = line.values[line.values.length - 1];
      if (last !== figure(f)) await fail(`${when}: ${chart} ${series} draws ${last}, event ${seen.lastId} says ${figure(f)}`);
      if (line.count !== c.samples || line.values.length !== c.samples) await fail(`${when}: ${chart} ${series} has ${line.count} points for ${c.samples} samples`);
      // Where the scale puts it: the right edge, at last / max of the height.
      const [x, y] = line.last;
      const want = 150 - (Math.min(last, c.max) / c.max) * 150;
      if (Math.abs(x - 600) > 0.01 || Math.abs(y - want) > 0.06) await fail(`${when}: ${chart} ${series} ends at ${x},${y}, not 600,${want} (max ${c.max})`);
      if (!(c.max >= last)) await fail(`${when}: ${chart} scale ${c.max} below its value ${last}`);
    }
  }
  for (const [id, figure] of Object.entries(FIGURES)) {
    if (seen.figures[id] !== figure(f)) await fail(`${when}: #${id} shows ${seen.figures[id]}, event ${seen.lastId} says ${figure(f)}`);
  }
  for (const [reason, total] of Object.entries(f.disconnects)) {
    if (seen.reasons[reason] !== total) await fail(`${when}: the legend says ${seen.reasons[reason]} ${reason} disconnects, the event ${total}`);
  }
  return f;
}

log(`launching ${process.env.CHROMIUM || "/usr/bin/chromium"}`);
const browser = await run("launching Chromium", () => launch());
state.browser = browser;
// A small phone's screen.
const PHONE = 375;
const page = await run("opening a page", () => browser.newPage({ viewport: { width: PHONE, height: 812 } }));
state.page = page;
page.setDefaultTimeout(timeoutMs);
page.on("pageerror", (e) => state.pageErrors.push(String(e)));
const elsewhere = [];
await page.route("**/*", (route) => {
  const u = route.request().url();
  if (u.startsWith(origin + "/")) return route.continue();
  elsewhere.push(u);
  return route.abort();
});

const response = await run(`loading ${url}`, () => page.goto(url, { waitUntil: "domcontentloaded" }));
if (!response?.ok()) await fail(`GET ${url} answered ${response?.status()}`);
await run('waiting for the page to be "live" with figures', () =>
  page.waitForFunction(() => document.getElementById("state").textContent === "live" && document.body.dataset.lastId),
);
const before = await page.evaluate(drawn);
const first = await check(before, "at first");
log(`live: event ${before.lastId}, ${first.streams_open} streams open of ${first.max_connections}`);

// The load: streams, then publishes to them, then the streams go.
const streams = await run(`opening ${STREAMS} streams on /events/load`, () =>
  Promise.all(Array.from({ length: STREAMS }, () => stream("/events/load"))),
);
const looks = [];
const look = async (when) => {
  const seen = await page.evaluate(drawn);
  looks.push(await check(seen, when));
  return seen;
};
let published = 0;
await run(`publishing every ${PUBLISH_EVERY_MS} ms for ${PUBLISH_FOR_MS} ms`, async () => {
  const until = Date.now() + PUBLISH_FOR_MS;
  let lastLook = Date.now();
  while (Date.now() < until) {
    const r = await fetch(`${origin}/publish/load`, { method: "POST", body: `event ${published}` });
    if (!r.ok) throw new Error(`POST /publish/load answered ${r.status}: ${await r.text()}`);
    published += 1;
    if (Date.now() - lastLook > 1000) {
      lastLook = Date.now();
      await look(`while publishing (${published} published)`);
    }
    await sleep(PUBLISH_EVERY_MS);
  }
});
log(`published ${published} events to ${STREAMS} streams`);
// The last publishes' second ends, then the page has it.
const after = await run("waiting for figures after the publishes", async () => {
  const since = (await page.evaluate(drawn)).lastId;
  await page.waitForFunction((id) => document.body.dataset.lastId !== id, since);
  await sleep(1100);
  return look("after publishing");
});
const peak = (chart, series) => Math.max(...after.charts[chart].lines[series].values);
const wantStreams = first.streams_open + STREAMS;
if (peak("chart-streams", "streams") < wantStreams) await fail(`the streams chart never reached ${wantStreams}: ${after.charts["chart-streams"].lines.streams.values}`);
if (!after.charts["chart-streams"].lines.cap) await fail("the cap is not drawn with the streams within a quarter of it");
const publishRate = (published * 1000) / PUBLISH_FOR_MS;
if (peak("chart-published", "published") < publishRate / 2) await fail(`published per second peaked at ${peak("chart-published", "published")}, ${publishRate} were published a second`);
if (peak("chart-delivered", "delivered") < (publishRate * STREAMS) / 2) await fail(`delivered per second peaked at ${peak("chart-delivered", "delivered")}, ${publishRate * STREAMS} a second were due`);
// The page's totals are /metrics' (nothing else publishes).
const m1 = await metrics();
if (after.figures["published-total"] !== m1.ssed_events_published_total || m1.ssed_events_published_total !== published) {
  await fail(`published: the page says ${after.figures["published-total"]}, /metrics ${m1.ssed_events_published_total}, ${published} were published`);
}
const threads = procStatus("Threads");
if (threads !== undefined) {
  const drawnThreads = after.figures["now-threads"];
  if (Math.abs(drawnThreads - threads) > 2) await fail(`the page draws ${drawnThreads} threads, /proc says ${threads}`);
  if (drawnThreads < wantStreams) await fail(`${drawnThreads} threads drawn for ${wantStreams} streams`);
  const rss = procStatus("VmRSS") * 1024;
  if (Math.abs(after.figures["now-rss"] - rss) > rss / 4) await fail(`the page draws ${after.figures["now-rss"]} bytes of RSS, /proc says ${rss}`);
  log(`threads: drawn ${drawnThreads}, /proc ${threads}; RSS drawn ${after.figures["now-rss"]}, /proc ${rss}`);
}

for (const s of streams) s.destroy();
log(`closed the ${STREAMS} streams`);
const gone = await run("waiting for the page to count the client disconnects", async () => {
  await page.waitForFunction(
    ([n, was]) => Number(document.querySelector('#reasons [data-reason="client"]')?.dataset.value) >= was + n,
    [STREAMS, first.disconnects.client],
  );
  return look("after closing the streams");
});
if (Math.max(...gone.charts["chart-disconnects"].lines.client.values) <= 0) await fail("the client disconnects line never left 0");
if (gone.figures["now-streams"] > first.streams_open) await fail(`${gone.figures["now-streams"]} streams drawn after closing, ${first.streams_open} before`);
const m2 = await metrics();
if (gone.reasons.client !== m2['ssed_disconnects_total{reason="client"}']) {
  await fail(`client disconnects: the page says ${gone.reasons.client}, /metrics ${m2['ssed_disconnects_total{reason="client"}']}`);
}

// On the phone: nothing wider than the screen, charts at a usable size.
if (gone.scrollWidth > PHONE) await fail(`the page is ${gone.scrollWidth} px wide on a ${PHONE} px screen`);
for (const [id, c] of Object.entries(gone.charts)) {
  if (c.width < 290 || c.height < 80) await fail(`${id} is drawn ${c.width}x${c.height} on the phone`);
}
if (elsewhere.length) await fail(`the page asked for ${elsewhere.join(", ")}`);
if (state.pageErrors.length) await fail("the page threw");
log(`checked ${looks.length} looks against the witness's ${witness.size} events`);

const phone = screenshot.replace(/\.png$/, "") + "-phone.png";
await run("taking the screenshots", async () => {
  await page.screenshot({ path: phone, fullPage: true });
  await page.setViewportSize({ width: 960, height: 600 });
  await sleep(300);
  await page.screenshot({ path: screenshot, fullPage: true });
});
log(`screenshots: ${screenshot}, ${phone}`);
witnessReq.destroy();
await browser.close();
log("ok");
process.exit(0);
