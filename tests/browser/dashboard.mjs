// Drives Debian's headless Chromium through the dashboard of a real muster-server.
// Started by tests/tests/dashboard.rs, which owns the server and the agents:
//   MUSTER_URL       https://127.0.0.1:PORT
//   MUSTER_TOKEN     an operator token
//   MUSTER_VIEWER_TOKEN  a viewer token
//   MUSTER_VICTIM    id of an agent the test kills when this script prints "kill-agent"
//   MUSTER_WORKER    id of an agent that stays up and runs a command
//   MUSTER_SIGNED    id of an agent whose agent.toml trusts MUSTER_SIGNED_KEY: it runs only
//                    signed jobs (hostname till-signed, label role=till, its own lane=7)
//   MUSTER_SHOTS     optional directory for screenshots (1280 px and a phone)
// The test answers "killed" on stdin once the victim is dead. Exit status 0 means every step
// passed; anything else comes with the step that failed.

import { launch } from './chromium.mjs';
import { createInterface } from 'node:readline';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const {
  MUSTER_URL: url, MUSTER_TOKEN: token, MUSTER_VIEWER_TOKEN: viewer, MUSTER_VICTIM: victim, MUSTER_WORKER: worker, MUSTER_SHOTS: shots,
  MUSTER_SIGNED: signed, MUSTER_SIGNED_KEY: signedKey,
} = process.env;
if (!url || !token || !viewer || !victim || !worker || !signed || !signedKey) {
  console.error('MUSTER_URL, MUSTER_TOKEN, MUSTER_VIEWER_TOKEN, MUSTER_VICTIM, MUSTER_WORKER, MUSTER_SIGNED and MUSTER_SIGNED_KEY must be set');
  process.exit(2);
}

const STEP_TIMEOUT = 20_000;
// The whole run stops by itself, whatever happens.
setTimeout(() => { console.error('dashboard test: overall deadline passed'); process.exit(1); }, 150_000).unref();

const lines = createInterface({ input: process.stdin });
const fromTest = [];
const waiters = [];
lines.on('line', (l) => { const w = waiters.shift(); if (w) w(l); else fromTest.push(l); });
const nextLine = () => new Promise((resolve) => { const l = fromTest.shift(); if (l !== undefined) resolve(l); else waiters.push(resolve); });

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
const ONLY_401 = /status of 401/;
let expected = ONLY_401;
let page = null;
try {
  // The server's certificate comes from its own generated CA, which this browser profile does not
  // know; the connection is still real TLS.
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 860 } });
  context.setDefaultTimeout(STEP_TIMEOUT);
  page = await context.newPage();
  page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
  // The refused sign-in is expected to log its 401, and the refused label its 400 while that
  // step runs; any other console error fails the test.
  page.on('console', (m) => { if (m.type() === 'error' && !expected.test(m.text())) errors.push(`console: ${m.text()}`); });
  page.on('request', (r) => { if (r.url().includes(token)) errors.push(`token in a URL: ${r.url()}`); });

  step('a wrong token is refused');
  await page.goto(`${url}/`);
  await page.fill('#token', 'mst_0000000000000000_wrongwrongwrong');
  await page.click('button[type=submit]');
  await page.getByRole('alert').filter({ hasText: 'refused' }).waitFor();

  step('signing in with the operator token');
  await page.fill('#token', token);
  await page.click('button[type=submit]');
  await page.locator('.live[data-state=live]').waitFor();
  check(await page.evaluate(() => sessionStorage.getItem('muster.token')) === token, 'the token is kept in sessionStorage');
  check(!page.url().includes(token), 'the token is not in the address');

  step('the fleet shows the agents online, and which one accepts only signed jobs');
  const victimRow = page.locator(`#agents tr[data-agent-id="${victim}"]`);
  await page.locator(`#agents tr[data-agent-id="${victim}"][data-status=online]`).waitFor();
  await page.locator(`#agents tr[data-agent-id="${worker}"][data-status=online]`).waitFor();
  await page.locator(`#agents tr[data-agent-id="${signed}"][data-status=online]`).waitFor();
  check((await page.locator('.counter[data-status=online] .value').textContent()) === '3', 'three agents counted online');
  check((await page.locator(`#agents tr[data-agent-id="${signed}"] .badge.signed`).getAttribute('title')).includes(signedKey), 'the marker names the key');
  check(await page.locator(`#agents tr[data-agent-id="${worker}"] .badge.signed`).count() === 0, 'an agent that trusts no key has no marker');
  check((await victimRow.locator('.chip').allTextContents()).includes('role=victim'), 'labels are shown');
  check((await victimRow.locator('.host').textContent()) === 'kiosk-victim', 'the hostname is shown');
  if (shots) await page.screenshot({ path: `${shots}/fleet-1280.png`, fullPage: true });

  step('filters: search by name, by status and by label');
  await page.fill('input[aria-label=Search]', 'pos-w');
  await victimRow.waitFor({ state: 'detached' });
  await page.locator(`#agents tr[data-agent-id="${worker}"]`).waitFor();
  await page.fill('input[aria-label=Search]', '');
  await victimRow.waitFor();
  await page.selectOption('select[aria-label=Status]', 'offline');
  await page.locator('#agents td.empty').waitFor();
  await page.selectOption('select[aria-label=Status]', '');
  await page.fill('input[aria-label="Label selector"]', 'role=worker');
  await victimRow.waitFor({ state: 'detached' });
  await page.locator(`#agents tr[data-agent-id="${worker}"]`).waitFor();
  await page.fill('input[aria-label="Label selector"]', '');
  await victimRow.waitFor();

  step('an agent killed turns offline without a reload');
  await page.evaluate(() => { window.sameDocument = true; });
  console.log('kill-agent');
  check((await nextLine()) === 'killed', 'the test killed the agent');
  await page.locator(`#agents tr[data-agent-id="${victim}"][data-status=offline]`).waitFor();
  check(await page.evaluate(() => window.sameDocument === true), 'the page was not reloaded');
  check((await page.locator('.counter[data-status=offline] .value').textContent()) === '1', 'one agent counted offline');
  // Its last heartbeat ages on the page by itself, second by second.
  const age = victimRow.locator('td[data-label=Heartbeat]');
  const then = await age.textContent();
  await page.waitForFunction(([id, was]) => document.querySelector(`#agents tr[data-agent-id="${id}"] td[data-label=Heartbeat]`).textContent !== was, [victim, then]);

  step('the Run page shows the dry-run count, then sends');
  await page.click('nav >> text=Run');
  await page.check('input[name=target][value=agents]');
  await page.fill('#target', worker);
  // The command prints a line, then waits for a file this script creates (the agent runs on this
  // machine), so the job page is seen running with partial output before it finishes.
  const gate = join(mkdtempSync(join(tmpdir(), 'muster-dashboard-')), 'go');
  await page.fill('#command', `echo "dashboard says hello from $MUSTER_AGENT_ID"; while [ ! -e ${gate} ]; do sleep 0.05; done; echo "and goodbye"`);
  await page.locator('#dry-run').filter({ hasText: 'Matches 1 agent' }).waitFor();
  await page.locator('#run:enabled').filter({ hasText: 'Run on 1 agent' }).waitFor();
  await page.click('#run');

  step('the job page shows the output as it comes, then the result');
  await page.waitForURL(/#\/jobs\/[0-9a-f]+$/);
  await page.locator('.group[data-state=running] pre.output').filter({ hasText: `dashboard says hello from ${worker}` }).waitFor();
  await page.locator(`#runs tr[data-agent-id="${worker}"][data-state=running]`).waitFor();
  writeFileSync(gate, '');
  const group = page.locator('.group[data-state=succeeded]');
  await group.locator('pre.output').filter({ hasText: `dashboard says hello from ${worker}\nand goodbye` }).waitFor();
  await page.locator(`#runs tr[data-agent-id="${worker}"][data-state=succeeded]`).waitFor();
  rmSync(join(gate, '..'), { recursive: true, force: true });
  check((await page.locator('#job-command').textContent()).includes('dashboard says hello'), 'the command heads the page');
  if (shots) await page.screenshot({ path: `${shots}/job-1280.png`, fullPage: true });

  step('the jobs list and the agent page show the run');
  await page.click('nav >> text=Jobs');
  await page.locator('#jobs tbody tr').filter({ hasText: 'dashboard says hello' }).waitFor();
  await page.goto(`${url}/#/agents/${worker}`);
  // The CPU chart plots the stored heartbeats (a line, or a dot while there is one bucket).
  await page.waitForFunction(() => {
    const chart = document.querySelector('.chart');
    return chart && ((chart.querySelector('path.line')?.getAttribute('d') || '').includes('L') || chart.querySelector('.dot'));
  });
  await page.getByRole('link', { name: /dashboard says hello/ }).waitFor();
  if (shots) await page.screenshot({ path: `${shots}/agent-1280.png`, fullPage: true });

  // The agent as the API holds it now, read by the page's own origin with the operator token.
  const apiLabels = (id) => page.evaluate(async ([agent, tok]) => {
    const res = await fetch(`/api/v1/agents/${agent}`, { headers: { Authorization: `Bearer ${tok}` } });
    return (await res.json()).labels;
  }, [id, token]);

  step('the label editor sets labels, refuses a bad one with the server\'s reason, and removes one');
  check(await page.locator('#signed-required').filter({ hasText: 'Not required' }).count() === 1, 'the worker requires no signature');
  await page.fill('#label-add', 'tier=gold zone=b');
  await page.press('#label-add', 'Enter');
  await page.locator('#labels .chip[data-key=tier]').filter({ hasText: 'tier=gold' }).waitFor();
  await page.locator('#labels .chip[data-key=zone]').filter({ hasText: 'zone=b' }).waitFor();
  check(await page.inputValue('#label-add') === '', 'the field is emptied once the server took the labels');
  let held = await apiLabels(worker);
  check(held.tier === 'gold' && held.zone === 'b' && held.role === 'worker', `the API holds the new labels: ${JSON.stringify(held)}`);
  expected = /status of 40[01]/;
  await page.fill('#label-add', 'agent.role=db');
  await page.press('#label-add', 'Enter');
  await page.locator('#label-error').filter({ hasText: 'cannot be edited' }).waitFor();
  expected = ONLY_401;
  check(await page.inputValue('#label-add') === 'agent.role=db', 'a refused label stays in the field');
  await page.fill('#label-add', '');
  await page.click('#labels .chip[data-key=tier] button.remove');
  await page.locator('#labels .chip[data-key=tier]').waitFor({ state: 'detached' });
  check(await page.locator('#label-error').isHidden(), 'the error goes once an edit succeeds');
  held = await apiLabels(worker);
  check(held.tier === undefined && held.zone === 'b', `the API no longer holds the removed label: ${JSON.stringify(held)}`);

  step('the page of an agent that requires signatures says so, with its key and its own labels apart');
  await page.goto(`${url}/#/agents/${signed}`);
  await page.locator('#signed-required').filter({ hasText: 'Required' }).waitFor();
  check((await page.locator('#trust code.key').allTextContents()).includes(signedKey), 'the trusted key is shown');
  check(await page.locator('h1 .badge.signed').count() === 1, 'the heading is marked');
  await page.locator('#reported-labels .chip[data-key="agent.lane"]').waitFor();
  check(await page.locator('#labels .chip[data-key="agent.lane"]').count() === 0, 'reported labels are not among the editable ones');
  check(await page.locator('#reported-labels button.remove').count() === 0, 'reported labels cannot be removed');
  await page.locator('#labels .chip[data-key=role]').filter({ hasText: 'role=till' }).waitFor();
  if (shots) await page.screenshot({ path: `${shots}/agent-signed-1280.png`, fullPage: true });

  step('the Run page says which targets accept only signed jobs and gives the signed CLI command');
  await page.goto(`${url}/#/run`);
  await page.check('input[name=target][value=selector]');
  await page.fill('#target', 'role in (worker,till)');
  await page.uncheck('#shell');
  await page.fill('#command', `echo "it's signed"`);
  const notice = page.locator('#signatures');
  await notice.filter({ hasText: '1 of 2 targets accept only signed jobs' }).waitFor();
  check((await notice.locator('code.key').allTextContents()).join() === signedKey, 'the notice names the key');
  const cli = `muster run --label 'role in (worker,till)' -- echo 'it'\\''s signed'`;
  check((await page.locator('#cli-command').textContent()) === cli, `the CLI command is quoted for a shell: ${await page.locator('#cli-command').textContent()}`);
  check(await page.locator('#run').isDisabled(), 'sending unsigned needs a confirmation');
  await page.check('#unsigned-ok');
  await page.locator('#run:enabled').waitFor();
  await page.uncheck('#unsigned-ok');
  await page.locator('#run:disabled').waitFor();
  if (shots) await page.screenshot({ path: `${shots}/run-signed-1280.png`, fullPage: true });
  await page.check('input[name=target][value=agents]');
  await page.fill('#target', signed);
  await notice.filter({ hasText: '1 of 1 target accept only signed jobs' }).waitFor();
  check((await page.locator('#cli-command').textContent()) === `muster run --agent ${signed} -- echo 'it'\\''s signed'`, 'the CLI command names the agent');
  check(await page.locator('#unsigned-ok').count() === 0, 'no confirmation when every target requires a signature');
  await page.locator('#run:disabled').filter({ hasText: 'Needs a signature' }).waitFor();

  step('on a phone the fleet is readable without scrolling sideways');
  await page.setViewportSize({ width: 390, height: 844 });
  await page.goto(`${url}/#/`);
  await page.locator(`#agents tr[data-agent-id="${worker}"]`).waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, `the page is ${overflow}px wider than the phone`);
  if (shots) await page.screenshot({ path: `${shots}/fleet-phone.png`, fullPage: true });

  step('signing out forgets the token; a viewer token may look but not run');
  await page.setViewportSize({ width: 1280, height: 860 });
  await page.click('text=Sign out');
  await page.locator('#token').waitFor();
  check(await page.evaluate(() => sessionStorage.getItem('muster.token')) === null, 'signing out clears the token');
  await page.fill('#token', viewer);
  await page.click('button[type=submit]');
  await page.locator('.live[data-state=live]').waitFor();
  await page.goto(`${url}/#/run`);
  await page.getByRole('alert').filter({ hasText: 'viewer role' }).waitFor();
  check(await page.locator('#run').isDisabled(), 'a viewer cannot press Run');
  await page.goto(`${url}/#/agents/${worker}`);
  await page.locator('#labels .chip[data-key=zone]').waitFor();
  check(await page.locator('#label-add').count() === 0, 'a viewer gets no label editor');
  check(await page.locator('#labels button.remove').count() === 0, 'a viewer cannot remove labels');

  check(errors.length === 0, errors.join('\n'));
  console.log('ok');
} catch (e) {
  console.error(`dashboard test failed at "${stepName}": ${e.message}`);
  if (errors.length) console.error(errors.join('\n'));
  if (shots && page) await page.screenshot({ path: `${shots}/failure.png`, fullPage: true }).catch(() => {});
  process.exitCode = 1;
} finally {
  await browser.close();
  lines.close();
}
