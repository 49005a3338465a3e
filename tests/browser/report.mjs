// The `ssed loadtest --report` page in headless Chromium, run by
// tests/browser.rs (or by hand):
//
//     node tests/browser/report.mjs /tmp/r.html target/tmp/report.png
//
// Opens the file:// URL of the page with every network request refused,
// and prints one line `RESULT {json}`: the page title, every SVG chart
// (its id and rendered size) and every `svg polyline` (its chart, its
// data-series and the number of points the browser parsed), the number of
// `svg rect` elements, the table's rows, the requests the page tried to make
// and the page's errors. Saves a screenshot. Exits 0 when that was read, 1
// on failure, 2 on bad arguments; the checks are the Rust test's.
//
// Environment: CHROMIUM (default /usr/bin/chromium), REPORT_TIMEOUT_MS
// (overall time limit, default 20000).

import { launch } from "./harness.mjs";
import { pathToFileURL } from "node:url";
import { resolve } from "node:path";

const [file, screenshot] = process.argv.slice(2);
if (!file || !screenshot || process.argv.length > 4) {
  console.error("usage: node report.mjs REPORT.html SCREENSHOT_PATH");
  process.exit(2);
}
const timeoutMs = Number(process.env.REPORT_TIMEOUT_MS) || 20000;
const url = pathToFileURL(resolve(file)).href;

let browser;
async function fail(message) {
  console.error(`FAIL: ${message}`);
  await browser?.close().catch(() => {});
  process.exit(1);
}
setTimeout(() => {
  setTimeout(() => process.exit(1), 3000).unref();
  fail(`timed out after ${timeoutMs} ms`);
}, timeoutMs);

try {
  browser = await launch();
  // A phone-sized viewport: the charts must scale down to it.
  const page = await browser.newPage({ viewport: { width: 390, height: 844 } });
  page.setDefaultTimeout(timeoutMs);
  const pageErrors = [];
  const requests = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  await page.route("**/*", (route) => {
    const u = route.request().url();
    if (u === url) return route.continue();
    requests.push(u);
    return route.abort();
  });
  await page.goto(url, { waitUntil: "load" });
  const found = await page.evaluate(() => {
    const charts = [...document.querySelectorAll("svg")].map((svg) => {
      const box = svg.getBoundingClientRect();
      return { id: svg.id, width: box.width, height: box.height };
    });
    const polylines = [...document.querySelectorAll("svg polyline")].map((p) => ({
      chart: p.ownerSVGElement?.id ?? "",
      series: p.getAttribute("data-series"),
      points: p.points.numberOfItems,
    }));
    return {
      title: document.title,
      charts,
      polylines,
      rects: document.querySelectorAll("svg rect").length,
      rows: document.querySelectorAll("tbody tr").length,
      scrollWidth: document.documentElement.scrollWidth,
    };
  });
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`RESULT ${JSON.stringify({ ...found, requests, pageErrors })}`);
  await browser.close();
  process.exit(0);
} catch (e) {
  await fail(e?.message ?? String(e));
}
