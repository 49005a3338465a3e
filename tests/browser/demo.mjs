// End-to-end check of the ssed demo page in headless Chromium, run by
// tests/browser.rs (or by hand against a running `ssed`):
//
//     node tests/browser/demo.mjs http://127.0.0.1:8080/ target/tmp/demo.png
//
// Opens the page, waits for the EventSource to be open, publishes a unique
// message through the form and waits for it to be listed with an event id
// (`<ms>-<seq>`). Saves a screenshot of the page to the given path, on
// failure too. Exits 0 on success, 1 on failure, 2 on bad arguments.
//
// Environment: CHROMIUM (default /usr/bin/chromium), DEMO_TIMEOUT_MS
// (overall time limit, default 20000).

import { harness, launch } from "./harness.mjs";

const [url, screenshot] = process.argv.slice(2);
if (!url || !screenshot || process.argv.length > 4) {
  console.error("usage: node demo.mjs PAGE_URL SCREENSHOT_PATH");
  process.exit(2);
}
const timeoutMs = Number(process.env.DEMO_TIMEOUT_MS) || 20000;
const ID = /^\d+-\d+$/;

const { log, run, fail, state: harnessState } = harness("demo", screenshot, timeoutMs);
const pageErrors = harnessState.pageErrors;

log(`launching ${process.env.CHROMIUM || "/usr/bin/chromium"}`);
// The HTTPS test trusts its throwaway certificate by its key's hash.
const browser = await run("launching Chromium", () =>
  launch((process.env.CHROMIUM_EXTRA_ARGS ?? "").split(" ").filter(Boolean)),
);
harnessState.browser = browser;
log(`browser ${browser.version()}`);
const page = await run("opening a page", () => browser.newPage({ viewport: { width: 900, height: 600 } }));
harnessState.page = page;
page.setDefaultTimeout(timeoutMs);
page.on("pageerror", (e) => pageErrors.push(String(e)));
page.on("console", (m) => {
  if (m.type() === "error" || m.type() === "warning") {
    const where = m.location()?.url;
    log(`console ${m.type()}: ${m.text()}${where ? ` (${where})` : ""}`);
  }
});

const response = await run(`loading ${url}`, () => page.goto(url, { waitUntil: "domcontentloaded" }));
if (!response?.ok()) await fail(`GET ${url} answered ${response?.status()}`);
log(`loaded ${url}: "${await page.title()}"`);

await run('waiting for #state to read "open"', () =>
  page.waitForFunction(() => document.getElementById("state")?.textContent === "open"),
);
log('#state reads "open"');

const message = `browser e2e ${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)} héllo ✓`;
await run("publishing through the form", async () => {
  await page.fill('#publish input[name="data"]', message);
  await page.click('#publish button[type="submit"]');
});
log(`published ${JSON.stringify(message)} through the form`);

// Waits for the event, or for the form to report an error (no use waiting
// for the event then).
const seen = await run(`waiting for an <li> in #events with ${JSON.stringify(message)} and an id`, async () => {
  const found = await page.waitForFunction(
    ([message, pattern]) => {
      for (const li of document.querySelectorAll("#events > li")) {
        const tag = li.querySelector(".id")?.textContent ?? "";
        if (li.textContent.includes(message) && new RegExp(pattern).test(tag)) return { id: tag };
      }
      const result = document.getElementById("result")?.textContent ?? "";
      return result.startsWith("error") ? { error: result } : null;
    },
    [message, ID.source],
  );
  return found.jsonValue();
});
if (seen.error) await fail(`the form reported ${JSON.stringify(seen.error)}`);
const { id } = seen;
log(`listed in #events with id ${id}`);

// The form's own report of the POST, and the rest of the page's state.
const result = await run("waiting for #result", async () => {
  await page.waitForFunction(() => document.getElementById("result")?.textContent !== "");
  return page.locator("#result").innerText();
});
const [lastId, state, reconnects, input] = await run("reading the page", () =>
  Promise.all([
    page.locator("#lastid").innerText(),
    page.locator("#state").innerText(),
    page.locator("#reconnects").innerText(),
    page.inputValue('#publish input[name="data"]'),
  ]),
);
log(`#result: ${result}`);
log(`#lastid: ${lastId}, #state: ${state}, #reconnects: ${reconnects}`);

const match = /^published as id (\S+) to (\d+) receiver/.exec(result);
if (!match) await fail(`the form reported ${JSON.stringify(result)}`);
if (match[1] !== id) await fail(`POST answered id ${match[1]} but the event arrived with id ${id}`);
if (lastId !== id) await fail(`#lastid shows ${lastId}, the event's id is ${id}`);
if (state !== "open") await fail(`#state reads ${JSON.stringify(state)} after publishing`);
if (input !== "") await fail(`the message input was not cleared: ${JSON.stringify(input)}`);
if (pageErrors.length) await fail("the page threw");

await run("taking the screenshot", () => page.screenshot({ path: screenshot, fullPage: true }));
log(`screenshot: ${screenshot}`);
await browser.close();
log("ok");
process.exit(0);
