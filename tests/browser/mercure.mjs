// Browser EventSources on ssed's Mercure endpoint, in headless Chromium,
// run by tests/browser.rs (or by hand against a running `ssed` with its
// defaults):
//
//     node tests/browser/mercure.mjs http://127.0.0.1:8080/ target/tmp/mercure.png
//
// Opens the daemon's page (for its origin), then four EventSources on
// /.well-known/mercure: by URI template (topic=), by URL pattern
// (match_urlpattern=), by exact topic (match=) and by `*`. Publishes, from
// this script as a Mercure publisher would (a form POST), an update none of
// the selectors but `*` match, one they all match (a custom id, an event
// type, two lines of data), a private one (these anonymous streams must not
// get it) and one more for the template, the pattern and `*`. A second
// browser context holds a JWT in the `mercureAuthorization` cookie that
// grants the template: its EventSource gets the private update too.
// Checks what each EventSource received, in order, and nothing else.
// Saves a screenshot of the page listing what arrived. Exits 0 on success,
// 1 on failure, 2 on bad arguments.
//
// Environment: MERCURE_JWT_SECRET (the daemon's `[auth] jwt_secret`:
// publishes and the granted subscriber use HS256 JWTs signed with it),
// CHROMIUM (default /usr/bin/chromium), DEMO_TIMEOUT_MS (overall time
// limit, default 20000).

import { createHmac } from "node:crypto";
import { harness, launch } from "./harness.mjs";

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot || process.argv.length > 4) {
  console.error("usage: node mercure.mjs PAGE_URL SCREENSHOT_PATH");
  process.exit(2);
}
const timeoutMs = Number(process.env.DEMO_TIMEOUT_MS) || 20000;
const { log, run, fail, state } = harness("mercure", screenshot, timeoutMs);

const hub = new URL("/.well-known/mercure", url).href;
const secret = process.env.MERCURE_JWT_SECRET;
if (!secret) {
  console.error("MERCURE_JWT_SECRET is not set");
  process.exit(2);
}

/** An HS256 JWT of `claims`, signed with the daemon's secret. */
function jwt(claims) {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${part({ alg: "HS256", typ: "JWT" })}.${part(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}
const publisher = jwt({ mercure: { publish: ["*"] } });
const BOOKS = "https://example.com/books/{id}";
const PATTERN = "https://example.com/books/:id";
const BOOK1 = "https://example.com/books/1";
const BOOK2 = "https://example.com/books/2";
const AUTHOR = "https://example.com/authors/1";

/** Publishes one update as a Mercure publisher does: a form POST. */
async function publish(fields) {
  const body = new URLSearchParams();
  for (const [k, v] of fields) body.append(k, v);
  const r = await fetch(hub, {
    method: "POST",
    body,
    headers: { Authorization: `Bearer ${publisher}` },
  });
  const text = await r.text();
  if (!r.ok) throw new Error(`publish answered ${r.status}: ${text}`);
  log(`published ${JSON.stringify(fields)} -> ${text}`);
  return text;
}

const browser = await run("launching Chromium", () => launch());
state.browser = browser;
log(`browser ${browser.version()}`);
const page = await run("opening a page", () => browser.newPage({ viewport: { width: 900, height: 500 } }));
state.page = page;
page.setDefaultTimeout(timeoutMs);
const response = await run(`loading ${url}`, () => page.goto(url, { waitUntil: "domcontentloaded" }));
if (!response?.ok()) await fail(`GET ${url} answered ${response?.status()}`);

const subscriptions = {
  template: `topic=${encodeURIComponent(BOOKS)}`,
  urlpattern: `match_urlpattern=${encodeURIComponent(PATTERN)}`,
  exact: `match=${encodeURIComponent(BOOK1)}`,
  star: "topic=*",
};
/** Opens an EventSource per subscription on `p`, each listing what it gets. */
const openAll = (p, subscriptions) =>
  p.evaluate(async (subscriptions) => {
    document.body.innerHTML = "<h1>Mercure subscribers</h1>";
    window.received = {};
    const opened = Object.entries(subscriptions).map(
      ([name, query]) =>
        new Promise((resolve, reject) => {
          window.received[name] = [];
          const list = document.createElement("ul");
          list.innerHTML = `<li><b>${name}</b>: ${decodeURIComponent(query)}</li>`;
          document.body.append(list);
          const es = new EventSource(`/.well-known/mercure?${query}`);
          const take = (e) => {
            window.received[name].push({ id: e.lastEventId, type: e.type, data: e.data });
            const li = document.createElement("li");
            li.textContent = `${e.type} #${e.lastEventId}: ${e.data}`;
            list.append(li);
          };
          es.onmessage = take;
          es.addEventListener("changed", take);
          es.onopen = resolve;
          es.onerror = () => reject(new Error(`${name}: EventSource error (state ${es.readyState})`));
        }),
    );
    await Promise.all(opened);
  }, subscriptions);
await run("opening the EventSources", () => openAll(page, subscriptions));
// A reader whose cookie grants the books: another context, another jar.
const granted = await run("opening a page with a JWT cookie", async () => {
  const context = await browser.newContext();
  await context.addCookies([
    { name: "mercureAuthorization", value: jwt({ mercure: { subscribe: [BOOKS] } }), url },
  ]);
  const p = await context.newPage();
  await p.goto(url, { waitUntil: "domcontentloaded" });
  await openAll(p, { granted: subscriptions.template });
  return p;
});
log("all five EventSources are open");

await run("publishing", async () => {
  await publish([["topic", AUTHOR], ["data", "author"]]);
  await publish([
    ["topic", BOOK1],
    ["topic", AUTHOR],
    ["id", "urn:uuid:book-1"],
    ["type", "changed"],
    ["data", "line 1\nline 2"],
  ]);
  await publish([["topic", BOOK1], ["data", "secret"], ["private", "on"]]);
  await publish([["topic", BOOK2], ["data", "two"]]);
});

const book1 = { id: "urn:uuid:book-1", type: "changed", data: "line 1\nline 2" };
const want = {
  template: [book1, { type: "message", data: "two" }],
  urlpattern: [book1, { type: "message", data: "two" }],
  exact: [book1],
  star: [{ type: "message", data: "author" }, book1, { type: "message", data: "two" }],
};
want.granted = [book1, { type: "message", data: "secret" }, { type: "message", data: "two" }];
const got = await run("waiting for every EventSource's updates", async () => {
  const all = (p) =>
    p.waitForFunction(
      (want) =>
        Object.entries(window.received).every(([k, seen]) => seen.length >= want[k].length),
      want,
    );
  await all(page);
  await all(granted);
  // A moment more, for anything that should not come.
  await page.waitForTimeout(300);
  return {
    ...(await page.evaluate(() => window.received)),
    ...(await granted.evaluate(() => window.received)),
  };
});
for (const [name, list] of Object.entries(want)) {
  const seen = got[name];
  if (seen.length !== list.length) {
    await fail(`${name}: ${seen.length} updates, want ${list.length}: ${JSON.stringify(seen)}`);
  }
  list.forEach((w, i) => {
    const s = seen[i];
    const same = s.type === w.type && s.data === w.data && (w.id === undefined || s.id === w.id);
    if (!same) fail(`${name}[${i}]: got ${JSON.stringify(s)}, want ${JSON.stringify(w)}`);
  });
  log(`${name}: ${JSON.stringify(seen.map((s) => s.data))}`);
}
if (state.failing) await new Promise(() => {});
await page.screenshot({ path: screenshot, fullPage: true });
log(`screenshot: ${screenshot}`);
await browser.close();
log("PASS");
process.exit(0);
