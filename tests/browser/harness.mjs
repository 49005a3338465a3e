// What the browser scripts share: launching Chromium headless (with
// CHROMIUM, default /usr/bin/chromium), an overall time limit, named
// steps, and failing once with the page's text and a screenshot.

import { chromium } from "playwright-core";

/** Launches headless Chromium in a fresh temporary profile (removed on close). */
export function launch(extraArgs = []) {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
      "--disable-quic",
      "--no-proxy-server",
      ...extraArgs,
    ],
  });
}

/**
 * A script's run: `log`, `run(what, f)` (a named step that fails the
 * script when it throws), `fail(message)` and the `state` it reports from
 * (`state.browser`, `state.page`, `state.pageErrors`). Fails by itself
 * after `timeoutMs`.
 */
export function harness(name, screenshot, timeoutMs) {
  const started = Date.now();
  const log = (msg) => console.log(`[${name} ${String(Date.now() - started).padStart(5)} ms] ${msg}`);
  const state = { browser: undefined, page: undefined, pageErrors: [], step: "starting", failing: false };

  async function fail(message) {
    // A timeout and the step it interrupts may both fail: report once.
    if (state.failing) return new Promise(() => {});
    state.failing = true;
    console.error(`FAIL: ${message}`);
    if (state.pageErrors.length) console.error(`page errors:\n  ${state.pageErrors.join("\n  ")}`);
    if (state.page) {
      try {
        console.error(`page text at failure:\n${await state.page.locator("body").innerText({ timeout: 1000 })}`);
        await state.page.screenshot({ path: screenshot, fullPage: true, timeout: 2000 });
        console.error(`screenshot of the failure: ${screenshot}`);
      } catch (e) {
        console.error(`(no page text or screenshot: ${e.message.split("\n")[0]})`);
      }
    }
    // Closing the browser matters: a Chromium left behind outlives the test.
    await state.browser?.close().catch(() => {});
    process.exit(1);
  }

  // The overall limit. If closing the browser hangs, exit anyway after 3 s:
  // Playwright's exit handler kills the browser it launched.
  setTimeout(() => {
    setTimeout(() => process.exit(1), 3000).unref();
    fail(`timed out after ${timeoutMs} ms while ${state.step}`);
  }, timeoutMs);

  /** Runs one step, naming it in the failure message. */
  async function run(what, f) {
    state.step = what;
    try {
      return await f();
    } catch (e) {
      return fail(`${what}: ${e?.message ?? e}`);
    }
  }

  return { log, run, fail, state };
}
