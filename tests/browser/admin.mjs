// Drives Debian's headless Chromium through the dashboard's admin actions of a real
// muster-server. Started by tests/tests/dashboard.rs, which owns the server and the agents:
//   MUSTER_URL        https://127.0.0.1:PORT
//   MUSTER_TOKEN      an admin token (not the one that created MUSTER_JOB)
//   MUSTER_PENDING    id of an agent enrolled with an approve token, not accepted yet
//   MUSTER_CLONED     id of an agent a copy of whose retired credential was refused
//   MUSTER_JOB        id of a job that waits for a second admin's approval
//   MUSTER_SHOTS      optional directory for screenshots
// Exit status 0 means every step passed; anything else comes with the step that failed.

import { launch } from './chromium.mjs';

const { MUSTER_URL: url, MUSTER_TOKEN: token, MUSTER_PENDING: pending, MUSTER_CLONED: cloned, MUSTER_JOB: job, MUSTER_SHOTS: shots } = process.env;
if (!url || !token || !pending || !cloned || !job) {
  console.error('MUSTER_URL, MUSTER_TOKEN, MUSTER_PENDING, MUSTER_CLONED and MUSTER_JOB must be set');
  process.exit(2);
}
setTimeout(() => { console.error('admin page test: overall deadline passed'); process.exit(1); }, 90_000).unref();

let stepName = 'start';
function step(name) {
  stepName = name;
  console.log(`step: ${name}`);
}

const browser = await launch();
const errors = [];
const confirmed = [];
let page = null;
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 860 } });
  context.setDefaultTimeout(20_000);
  page = await context.newPage();
  page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
  // The admin actions ask before acting; this admin says yes, and the question is checked.
  page.on('dialog', (d) => { confirmed.push(d.message()); d.accept(); });
  page.on('console', (m) => { if (m.type() === 'error') errors.push(`console: ${m.text()}`); });

  await page.goto(`${url}/`);
  await page.fill('#token', token);
  await page.click('button[type=submit]');
  await page.locator('.live[data-state=live]').waitFor();

  step('the fleet marks the agent that waits for approval');
  await page.locator(`tr[data-agent-id="${pending}"] .badge.pending`).waitFor();

  step('an admin accepts it from its page');
  await page.goto(`${url}/#/agents/${pending}`);
  await page.locator('#pending-notice').waitFor();
  await page.click('#accept-agent');
  await page.locator('#pending-notice').waitFor({ state: 'detached' });
  await page.locator('#accept-agent').waitFor({ state: 'detached' });
  if (await page.locator('h1 .badge.pending').count() !== 0) throw new Error('still marked pending after accepting');

  step('and rotates its credential, after saying what that does');
  const rotated = page.waitForResponse((r) => r.url().endsWith(`/agents/${pending}/rotate-credential`) && r.status() === 202);
  await page.click('#rotate-credential');
  await rotated;
  if (!confirmed.some((m) => m.includes('reported as a clone'))) throw new Error(`the rotation was not explained: ${confirmed}`);

  step('an agent whose retired credential came back says so');
  await page.goto(`${url}/#/agents/${cloned}`);
  await page.locator('#clone-notice').filter({ hasText: 'a copy of this machine' }).waitFor();
  if (shots) await page.screenshot({ path: `${shots}/agent-clone-1280.png`, fullPage: false });

  step('a job that waits for a second admin says so, and this admin approves it');
  await page.goto(`${url}/#/jobs/${job}`);
  await page.locator('.notice').filter({ hasText: 'nothing runs until an admin other than' }).waitFor();
  await page.click('#approve-job');
  await page.locator('#approve-job').waitFor({ state: 'detached' });
  if (!confirmed.some((m) => m.startsWith('Approve this job?'))) throw new Error(`the approval was not asked: ${confirmed}`);
  await page.waitForFunction(() => [...document.querySelectorAll('.pill')].some((p) => p.dataset.state === 'succeeded'));

  if (errors.length) throw new Error(errors.join('\n'));
  console.log('ok');
} catch (e) {
  console.error(`admin page test failed at "${stepName}": ${e.message}`);
  if (errors.length) console.error(errors.join('\n'));
  if (shots && page) await page.screenshot({ path: `${shots}/admin-failure.png`, fullPage: true }).catch(() => {});
  process.exitCode = 1;
} finally {
  await browser.close();
}
