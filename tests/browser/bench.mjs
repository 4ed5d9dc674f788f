// The dashboard's fleet page against a large simulated fleet, in Debian's headless Chromium.
// Run by tests/bench/dashboard.sh, which starts the server and the simulated agents:
//   MUSTER_URL, MUSTER_TOKEN, AGENTS (how many the page should count), WATCH (seconds of live
//   events to measure the page's main-thread load over).
// Prints one line per figure.

import { launch } from './chromium.mjs';

const { MUSTER_URL: url, MUSTER_TOKEN: token } = process.env;
const agents = Number(process.env.AGENTS || 0);
const watch = Number(process.env.WATCH || 30);
if (!url || !token || !agents) {
  console.error('MUSTER_URL, MUSTER_TOKEN and AGENTS must be set');
  process.exit(2);
}
setTimeout(() => { console.error('bench: deadline passed'); process.exit(1); }, (watch + 120) * 1000).unref();

const browser = await launch();
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 860 } });
  context.setDefaultTimeout(60_000);
  const page = await context.newPage();
  let listBytes = 0;
  page.on('response', async (r) => {
    if (new URL(r.url()).pathname === '/api/v1/agents' && !listBytes) listBytes = (await r.body()).length;
  });
  await page.goto(`${url}/`);
  await page.fill('#token', token);
  const started = Date.now();
  await page.click('button[type=submit]');
  await page.locator('.counter[data-status=all] .value', { hasText: String(agents) }).waitFor();
  await page.locator('#agents tbody tr:nth-child(200)').waitFor();
  const firstDraw = Date.now() - started;
  console.log(`agents: ${agents}`);
  console.log(`sign-in to a drawn fleet table: ${firstDraw} ms`);
  console.log(`GET /api/v1/agents body: ${(listBytes / 1024 / 1024).toFixed(1)} MiB`);

  const cdp = await context.newCDPSession(page);
  await cdp.send('Performance.enable');
  const metric = async (name) => (await cdp.send('Performance.getMetrics')).metrics.find((m) => m.name === name).value;
  // The same stream the page reads, counted here (the server's CA comes in NODE_EXTRA_CA_CERTS).
  let streamed = 0;
  const counting = new AbortController();
  fetch(`${url}/api/v1/events`, { headers: { Authorization: `Bearer ${token}` }, signal: counting.signal })
    .then(async (res) => {
      const dec = new TextDecoder();
      for await (const chunk of res.body) streamed += (dec.decode(chunk, { stream: true }).match(/\ndata: /g) || []).length;
    })
    .catch(() => {});
  const busy0 = await metric('TaskDuration');
  const t0 = Date.now();
  await page.waitForTimeout(watch * 1000);
  const busy = (await metric('TaskDuration')) - busy0;
  const elapsed = (Date.now() - t0) / 1000;
  counting.abort();
  console.log(`fleet events streamed: ${(streamed / elapsed).toFixed(0)}/s`);
  if (process.env.PROFILE) {
    // Where the page's own time goes: self time by function over 10 s of live events.
    await cdp.send('Profiler.enable');
    await cdp.send('Profiler.start');
    await page.waitForTimeout(10_000);
    const { profile } = await cdp.send('Profiler.stop');
    const self = new Map();
    const dt = profile.timeDeltas;
    const byId = new Map(profile.nodes.map((n) => [n.id, n]));
    profile.samples.forEach((id, i) => {
      const f = byId.get(id).callFrame;
      const key = `${f.functionName || '(anonymous)'} ${f.url.split('/').pop()}:${f.lineNumber + 1}`;
      self.set(key, (self.get(key) || 0) + (dt[i] || 0) / 1000);
    });
    for (const [k, ms] of [...self.entries()].sort((a, b) => b[1] - a[1]).slice(0, 15)) console.log(`  ${ms.toFixed(0).padStart(6)} ms  ${k}`);
  }
  const heap = await metric('JSHeapUsedSize');
  const live = await page.locator('.live').getAttribute('data-state');
  console.log(`main thread busy while live: ${((busy / elapsed) * 100).toFixed(1)}% over ${elapsed.toFixed(0)} s (stream ${live})`);
  console.log(`JS heap used: ${(heap / 1024 / 1024).toFixed(1)} MiB`);
} finally {
  await browser.close();
}
