// The page of `prs serve` in a real browser (Debian's headless Chromium, driven by
// playwright-core): load it, choose a scan, predict, wait for the overlay and the answer, move
// the threshold, predict again, go back in the history, and check the phone layout. Saves
// screenshots; exits non-zero on the first thing that does not work.
// Usage: node page_check.mjs <server url> <image> <screenshot folder>
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";

const [url, image, outDir] = process.argv.slice(2);
if (!url || !image || !outDir) {
  console.error("usage: node page_check.mjs <server url> <image> <screenshot folder>");
  process.exit(2);
}
mkdirSync(outDir, { recursive: true });

function check(ok, what) {
  if (!ok) throw new Error(what);
  console.log("ok  " + what);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
  const problems = [];
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  page.on("console", (m) => { if (m.type() === "error") problems.push("console: " + m.text()); });
  page.on("request", (r) => { if (!r.url().startsWith(url) && !/^(data|blob):/.test(r.url())) problems.push("outside request: " + r.url()); });

  await page.goto(url);
  await page.waitForFunction(() => !document.getElementById("model").textContent.includes("connecting"));
  check((await page.inputValue("#question")).trim().length > 0, "the question box starts with a question");
  check(await page.isDisabled("#predict"), "Predict waits for an image");

  await page.setInputFiles("#file", image);
  check(!(await page.isDisabled("#predict")), "choosing a scan enables Predict");
  await page.click("#predict");
  await page.waitForSelector("#overlay[data-ready]", { timeout: 120000 });
  const answer = (await page.textContent("#answer")).trim();
  check(answer.length > 0, `the answer is shown: "${answer}"`);
  const first = await page.getAttribute("#overlay", "data-ready");
  for (const id of ["#position", "#mask-position", "#area", "#bbox", "#timings"]) {
    check((await page.textContent(id)).trim().length > 0, `${id} is filled`);
  }
  check((await page.getAttribute("#download-mask", "href")).startsWith("data:image/png;base64,"), "the mask can be downloaded");
  check((await page.getAttribute("#download-json", "href")).startsWith("blob:"), "the JSON can be downloaded");
  // The overlay is drawn: some pixels carry the mask's red, and the canvas has the image's size.
  const drawn = await page.evaluate(() => {
    const c = document.getElementById("overlay");
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let red = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] === 255 && d[i + 1] === 40 && d[i + 2] === 40) red++;
    return { w: c.width, h: c.height, red };
  });
  const area = await page.textContent("#area");
  check(drawn.w > 0 && drawn.h > 0, `the overlay canvas is ${drawn.w}x${drawn.h}`);
  check(area.includes("empty") || drawn.red > 0, `the mask's contour is drawn (${drawn.red} contour pixels, area: ${area})`);
  await page.screenshot({ path: `${outDir}/desktop.png`, fullPage: true });

  // A long unbroken word (answers of an untrained model have them) must wrap, not widen the page.
  await page.fill("#question", "Where is the lesion? " + "A".repeat(160));
  // The slider re-draws a preview without a request.
  await page.fill("#threshold", "0.8");
  await page.dispatchEvent("#threshold", "input");
  check((await page.textContent("#threshold-note")).includes("Preview at 0.80"), "the threshold slider previews");
  await page.click("#predict");
  await page.waitForFunction((prev) => document.getElementById("overlay").dataset.ready !== prev, first, { timeout: 120000 });
  check((await page.textContent("#threshold-note")).includes("0.80"), "a new prediction at the slider's threshold");
  check((await page.locator("#history li").count()) === 2, "two earlier queries are listed");
  await page.click(`#history li[data-id="${first}"]`);
  check((await page.getAttribute("#overlay", "data-ready")) === first, "an earlier query can be shown again");

  // Phone width: nothing wider than the screen.
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  // Boxes past the right edge, and boxes whose content (a long word) spills out of them.
  const wide = await page.evaluate(() => [...document.querySelectorAll("body *")]
    .filter((e) => e.getBoundingClientRect().right > window.innerWidth + 0.5 || e.scrollWidth > e.clientWidth + 1)
    .filter((e) => getComputedStyle(e).overflowX === "visible" && e.tagName !== "CANVAS")
    .map((e) => e.tagName.toLowerCase() + (e.id ? "#" + e.id : "")).slice(0, 6).join(", "));
  check(overflow <= 0 && !wide, `no horizontal scrolling at phone width (overflow ${overflow} px${wide ? ": " + wide : ""})`);
  await page.screenshot({ path: `${outDir}/phone.png`, fullPage: true });
  check(problems.length === 0, "no page errors, console errors or outside requests" + (problems.length ? ": " + problems.join("; ") : ""));
} catch (e) {
  console.error("FAILED: " + e.message);
  failed = true;
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
