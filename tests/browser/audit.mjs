// Drives Debian's headless Chromium through the dashboard's Audit page of a real muster-server.
// Started by tests/tests/dashboard.rs, which owns the server:
//   MUSTER_URL            https://127.0.0.1:PORT
//   MUSTER_ADMIN_TOKEN    an admin token
//   MUSTER_TOKEN          an operator token
//   MUSTER_ENTRIES        how many entries the log holds (more than one page of 100)
//   MUSTER_SHOTS          optional directory for a screenshot
// Exit status 0 means every step passed; anything else comes with the step that failed.

import { launch } from './chromium.mjs';

const { MUSTER_URL: url, MUSTER_ADMIN_TOKEN: admin, MUSTER_TOKEN: operator, MUSTER_ENTRIES: entries, MUSTER_SHOTS: shots } = process.env;
if (!url || !admin || !operator || !entries) {
  console.error('MUSTER_URL, MUSTER_ADMIN_TOKEN, MUSTER_TOKEN and MUSTER_ENTRIES must be set');
  process.exit(2);
}
setTimeout(() => { console.error('audit page test: overall deadline passed'); process.exit(1); }, 90_000).unref();

let stepName = 'start';
function step(name) {
  stepName = name;
  console.log(`step: ${name}`);
}
function check(cond, message) {
  if (!cond) throw new Error(message);
}

const browser = await launch();
const errors = [];
let page = null;
try {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 860 } });
  context.setDefaultTimeout(20_000);
  page = await context.newPage();
  page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
  page.on('dialog', (d) => { errors.push(`a dialog opened: ${d.message()}`); d.dismiss(); });
  page.on('console', (m) => { if (m.type() === 'error') errors.push(`console: ${m.text()}`); });

  async function signIn(token) {
    await page.goto(`${url}/`);
    await page.fill('#token', token);
    await page.click('button[type=submit]');
    await page.locator('.live[data-state=live]').waitFor();
  }

  step('an admin sees the Audit page, newest first, a page at a time');
  await signIn(admin);
  await page.click('nav a[data-nav=audit]');
  await page.locator('#audit tr[data-action="token.create"]').first().waitFor();
  const rows = page.locator('#audit tbody tr[data-audit-id]');
  check(await rows.count() === 100, `the first page holds 100 entries, not ${await rows.count()}`);
  const ids = await rows.evaluateAll((trs) => trs.map((tr) => Number(tr.dataset.auditId)));
  check(ids.every((id, i) => i === 0 || id < ids[i - 1]), 'newest first');
  await page.click('#audit-older');
  await page.waitForFunction((n) => document.querySelectorAll('#audit tbody tr[data-audit-id]').length === n, Number(entries));
  await page.locator('#audit-older').waitFor({ state: 'hidden' });
  check(await page.locator('#audit tr[data-action="audit.genesis"]').count() === 1, 'the last page ends with the genesis entry');
  if (shots) await page.screenshot({ path: `${shots}/audit-1280.png`, fullPage: false });

  step('markup in an entry is shown as text');
  check(await page.locator('#audit img').count() === 0, 'a token name with markup made an element');
  await page.getByText('<img src=x onerror=alert(1)>', { exact: false }).first().waitFor();

  step('filters narrow the table and are kept in the address');
  await page.fill('#audit-filters input[name=action]', 'token.revoke');
  await page.click('#audit-filters button[type=submit]');
  await page.waitForFunction(() => {
    const trs = [...document.querySelectorAll('#audit tbody tr[data-audit-id]')];
    return trs.length === 1 && trs[0].dataset.action === 'token.revoke';
  });
  check(page.url().includes('action=token.revoke'), `the filter is in the address: ${page.url()}`);

  step('an operator has no Audit page');
  await page.click('text=Sign out');
  await signIn(operator);
  check(await page.locator('nav a[data-nav=audit]').count() === 0, 'no Audit link for an operator');
  await page.goto(`${url}/#/audit`);
  await page.getByRole('alert').filter({ hasText: 'admin token' }).waitFor();

  check(errors.length === 0, errors.join('\n'));
  console.log('ok');
} catch (e) {
  console.error(`audit page test failed at "${stepName}": ${e.message}`);
  if (errors.length) console.error(errors.join('\n'));
  if (shots && page) await page.screenshot({ path: `${shots}/audit-failure.png`, fullPage: true }).catch(() => {});
  process.exitCode = 1;
} finally {
  await browser.close();
}
