// Drives the router's web console in headless Chromium against a real cluster.
//
// Run by a Rust integration test as `node tests/browser/console.mjs` (cwd = repo root).
// Env: CONSOLE_URL, CONSOLE_API_KEY (set when the server requires a key),
// SCREENSHOT_DIR, EXPECT_REPLICAS, CHROMIUM (default /usr/bin/chromium), and
// EXPECT_EMPTY=1 when the drain at the end must leave the cluster empty.
// Protocol on stdio: `STEP <text>` reports progress; `ACTION <name>` asks the test
// to act (kill-shard, stop-router, start-router) and waits for one line (`done`)
// on stdin; `FAIL <reason>` then exit 1 on failure (with SCREENSHOT_DIR/failure.png).

import fs from 'node:fs';
import path from 'node:path';
import readline from 'node:readline';
import { chromium } from 'playwright-core';

const URL = process.env.CONSOLE_URL || 'http://127.0.0.1:18080/';
const API_KEY = process.env.CONSOLE_API_KEY || '';
const SHOTS = process.env.SCREENSHOT_DIR || '';
const EXPECT = Number.parseInt(process.env.EXPECT_REPLICAS || '2', 10);
const EXPECT_EMPTY = process.env.EXPECT_EMPTY === '1';
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

const RUN_LIMIT_MS = 5 * 60 * 1000;
const WAIT_MS = 60 * 1000; // the longest any single wait may take

let browser = null;
let page = null;
let failing = false;

const step = (text) => console.log(`STEP ${text}`);

// ------------------------------------------------------------- stdin actions

const stdinLines = [];
const stdinWaiters = [];
let stdinClosed = false;
const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  const w = stdinWaiters.shift();
  if (w) w.resolve(line); else stdinLines.push(line);
});
rl.on('close', () => {
  stdinClosed = true;
  for (const w of stdinWaiters.splice(0)) w.reject(new Error('stdin closed while waiting for an action'));
});

/** Asks the test to do `name` and waits (bounded) for its `done`. */
async function action(name) {
  console.log(`ACTION ${name}`);
  const line = await withTimeout(new Promise((resolve, reject) => {
    if (stdinLines.length) resolve(stdinLines.shift());
    else if (stdinClosed) reject(new Error('stdin closed while waiting for an action'));
    else stdinWaiters.push({ resolve, reject });
  }), WAIT_MS, `no reply to ACTION ${name}`);
  if (line.trim() !== 'done') throw new Error(`ACTION ${name}: expected "done", got ${JSON.stringify(line)}`);
}

function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms); }),
  ]).finally(() => clearTimeout(timer));
}

// ------------------------------------------------------------------ failures

// Page errors and CSP violations fail the run at once: `problem` rejects,
// and main() is raced against it.
let rejectProblem;
const problem = new Promise((_, reject) => { rejectProblem = reject; });
problem.catch(() => {});

async function shot(name) {
  if (!SHOTS || !page) return;
  await page.screenshot({ path: path.join(SHOTS, name), timeout: 15000 });
}

async function fail(reason) {
  if (failing) return;
  failing = true;
  console.log(`FAIL ${String(reason).replace(/\s+/g, ' ').trim()}`);
  try { await withTimeout(shot('failure.png'), 20000, 'failure screenshot'); } catch (e) { console.error('no failure screenshot:', e.message); }
  try { if (browser) await withTimeout(browser.close(), 10000, 'browser close'); } catch (_) { /* exiting anyway */ }
  process.exit(1);
}

// ------------------------------------------------------------ page helpers

/** Waits until `fn(arg)` is truthy in the page; `what` names it in the failure. */
async function until(what, fn, arg, timeout = WAIT_MS) {
  try {
    return await page.waitForFunction(fn, arg, { timeout, polling: 250 });
  } catch (e) {
    throw new Error(`${what} (within ${timeout / 1000} s): ${e.message.split('\n')[0]}`);
  }
}

/** Replica states as the page shows them, for failure messages and logs. */
const replicaStates = () => page.evaluate(() =>
  [...document.querySelectorAll('[data-replica-id]')].map((r) => `${r.dataset.replicaId}:${r.dataset.state}`).join(' ') || 'none');

/** In page: the number of replicas shown ready, each with rank rows that have an address. */
function readyWithRanks() {
  return [...document.querySelectorAll('[data-replica-id]')].filter((r) => {
    if (r.dataset.state !== 'ready') return false;
    const rows = [...r.querySelectorAll('[data-rank]')];
    return rows.length > 0 && rows.every((row) => {
      const a = row.querySelector('.addr');
      return a && /\S:\d+$/.test(a.textContent.trim());
    });
  }).length;
}

async function waitReady(n, what, timeout = WAIT_MS) {
  try {
    await until(what, new Function('n', `return (${readyWithRanks.toString()})() === n;`), n, timeout);
  } catch (e) {
    throw new Error(`${e.message} — replicas shown: ${await replicaStates()}`);
  }
}

async function openTab(name) {
  await page.click(`#tab-${name}`);
  await until(`#view-${name} visible`, (n) => !document.getElementById(`view-${n}`).hidden, name, 10000);
}

/**
 * The page's own fetch with the key the console uses. Returns the status and
 * the error message, whether it came as a JSON error body or (on a 200
 * stream) as an SSE `data: {"error": ...}` event.
 */
function pageFetchError(urlPath, init) {
  return page.evaluate(async ([p, i, key]) => {
    const headers = { ...(i.headers || {}) };
    if (key) headers.Authorization = `Bearer ${key}`;
    const res = await fetch(p, { ...i, headers, signal: AbortSignal.timeout(30000) });
    const text = await res.text();
    let message = null;
    try { message = JSON.parse(text).error.message; } catch (_) {
      for (const line of text.split('\n')) {
        if (!line.startsWith('data:')) continue;
        try {
          const e = JSON.parse(line.slice(5)).error;
          if (e && e.message) { message = e.message; break; }
        } catch (_) { /* [DONE] or a partial line */ }
      }
    }
    return { status: res.status, message, text: text.slice(0, 300) };
  }, [urlPath, init, API_KEY]);
}

// -------------------------------------------------------------------- steps

async function stepKey() {
  if (!API_KEY) {
    step('no API key configured');
    return;
  }
  step('API key: expecting the key dialog');
  await page.locator('#api-key').waitFor({ state: 'visible', timeout: WAIT_MS });
  // The message the server gives for a wrong key, fetched without the console's help.
  const wrongKey = `wrong-${Date.now()}`;
  const probe = await page.evaluate(async (k) => {
    const res = await fetch('v1/models', { headers: { Authorization: `Bearer ${k}` } });
    return { status: res.status, body: await res.json().catch(() => null) };
  }, wrongKey);
  const expected = probe.body && probe.body.error && probe.body.error.message;
  if (probe.status !== 401 || !expected) throw new Error(`a wrong key got ${probe.status} ${JSON.stringify(probe.body)}, expected 401 with an error message`);

  await page.fill('#api-key', wrongKey);
  await page.click('#api-key-save');
  await until('the 401 message in the key dialog', (msg) => {
    const e = document.getElementById('api-key-error');
    return e && !e.hidden && e.textContent.trim() === msg;
  }, expected);
  step(`wrong key rejected: "${expected}"`);

  await page.fill('#api-key', API_KEY);
  await page.click('#api-key-save');
  await page.locator('#key-dialog').waitFor({ state: 'hidden', timeout: WAIT_MS });
  step('right key accepted');
}

async function stepCluster() {
  step(`cluster: waiting for ${EXPECT} ready replicas with ranks`);
  await waitReady(EXPECT, `${EXPECT} replicas ready with rank addresses`);
  step(`cluster shows ${await replicaStates()}`);
  await shot('cluster.png');
}

async function stepPlayground() {
  step('playground: streaming a short answer');
  await openTab('playground');
  await page.fill('#max-tokens', '24');
  await page.fill('#prompt', 'Tell me a story.');
  // Count the changes to the new assistant message until its stats appear.
  await page.evaluate(() => {
    const rec = { changes: 0, beforeStats: null };
    window.__consoleTest = rec;
    const obs = new MutationObserver((records) => {
      for (const r of records) {
        if (rec.beforeStats !== null) return;
        const added = [...r.addedNodes].some((n) => n.nodeType === 1 && n.matches('.stats'));
        if (added) { rec.beforeStats = rec.changes; obs.disconnect(); return; }
        const target = r.target.nodeType === 1 ? r.target : r.target.parentElement;
        if (target && target.closest('.msg.assistant')) rec.changes += 1;
      }
    });
    obs.observe(document.getElementById('transcript'), { subtree: true, childList: true, characterData: true });
  });
  const answers = page.locator('.msg.assistant');
  const before = await answers.count();
  await page.click('#send');
  const answer = answers.nth(before);
  await answer.locator('.stats').waitFor({ state: 'visible', timeout: WAIT_MS });
  const rec = await page.evaluate(() => window.__consoleTest);
  const text = (await answer.locator('.msg-content').textContent()) || '';
  if (await answer.locator('.error').count()) throw new Error(`the answer shows an error: ${await answer.locator('.error').textContent()}`);
  if (!(rec.beforeStats >= 2)) throw new Error(`the answer changed ${rec.beforeStats} times before its stats appeared, expected it to stream (≥ 2)`);
  const stats = await answer.locator('.stats').evaluate((s) => ({ ...s.dataset, text: s.textContent }));
  const ttft = Number(stats.ttftMs);
  const completion = Number(stats.completionTokens);
  const prompt = Number(stats.promptTokens);
  if (!(ttft > 0) || !/TTFT/.test(stats.text)) throw new Error(`no TTFT in the stats: ${JSON.stringify(stats)}`);
  if (!(completion > 0) || !(prompt > 0)) throw new Error(`token counts missing from the stats: ${JSON.stringify(stats)}`);
  step(`streamed ${text.length} chars in ${rec.beforeStats} updates; stats: ${stats.text}`);
  await shot('playground.png');

  step('playground: a request the server refuses shows its error message');
  await page.fill('#max-tokens', '100000000');
  await page.fill('#prompt', 'Tell me a story.');
  const sent = page.waitForRequest((r) => r.method() === 'POST' && r.url().endsWith('/v1/chat/completions'), { timeout: WAIT_MS });
  const count = await answers.count();
  await page.click('#send');
  const body = (await sent).postData();
  const failed = answers.nth(count);
  await failed.locator('.error').waitFor({ state: 'visible', timeout: WAIT_MS });
  const shown = ((await failed.locator('.error').textContent()) || '').trim();
  const direct = await pageFetchError('v1/chat/completions', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body });
  const want = direct.message;
  if (!want) throw new Error(`the same request got ${direct.status} ${JSON.stringify(direct.text)}, expected an error`);
  if (shown !== want) throw new Error(`the console shows ${JSON.stringify(shown)}, the server says ${JSON.stringify(want)}`);
  step(`error shown verbatim (${direct.status}): "${shown}"`);
  await page.fill('#max-tokens', '256');
}

async function stepTraffic() {
  step('traffic: waiting for a chart with data');
  await openTab('traffic');
  await until('a chart with at least one point', () =>
    [...document.querySelectorAll('.chart')].some((c) => Number(c.dataset.points) >= 1), undefined, 30000);
  const points = await page.evaluate(() => [...document.querySelectorAll('.chart')].map((c) => `${c.dataset.chart || '?'}=${c.dataset.points}`).join(' '));
  step(`charts: ${points}`);
  await shot('traffic.png');
}

async function stepKill() {
  await openTab('cluster');
  await action('kill-shard');
  step(`cluster: waiting for ${EXPECT - 1} ready replicas after the kill`);
  await waitReady(EXPECT - 1, `${EXPECT - 1} replicas ready after a shard was killed`);
  // Let the page settle on the killed replica's fate (failed or gone) before the shot.
  step(`cluster shows ${await replicaStates()}`);
  await shot('cluster-after-kill.png');
}

async function stepRestart() {
  await action('stop-router');
  step('router stopped: expecting the connection banner');
  await page.locator('#conn-banner').waitFor({ state: 'visible', timeout: 15000 });
  await shot('disconnected.png');
  await action('start-router');
  step('router started: expecting the banner to go and the replicas to come back');
  const t0 = Date.now();
  await page.locator('#conn-banner').waitFor({ state: 'hidden', timeout: WAIT_MS });
  await waitReady(EXPECT - 1, `${EXPECT - 1} replicas ready after the router restarted`, Math.max(1000, WAIT_MS - (Date.now() - t0)));
  step(`reconnected after ${Date.now() - t0} ms; cluster shows ${await replicaStates()}`);
}

async function stepDrain() {
  const id = await page.evaluate(() => {
    const r = document.querySelector('[data-replica-id][data-state="ready"]');
    return r ? r.dataset.replicaId : null;
  });
  if (id === null) throw new Error('no ready replica to drain');
  step(`drain: replica ${id}`);
  const card = page.locator(`[data-replica-id="${id}"]`);
  await card.locator('.drain').click({ timeout: WAIT_MS });
  await page.locator('#confirm-ok').click({ timeout: WAIT_MS });
  await until(`replica ${id} draining or gone`, (rid) => {
    const r = document.querySelector(`[data-replica-id="${rid}"]`);
    return !r || r.dataset.state === 'draining';
  }, id);
  step(`replica ${id} is draining or gone; cluster shows ${await replicaStates()}`);
  // A drained replica leaves the cluster once its requests are done. When it
  // was the last one listed, the empty state must show; when others are still
  // listed (a failed one, say) the cluster is not going to be empty.
  const outcome = await until(`replica ${id} gone, and the empty state when it was the last one`, (rid) => {
    const reps = [...document.querySelectorAll('[data-replica-id]')];
    if (reps.some((r) => r.dataset.replicaId === rid)) return false;
    const empty = document.getElementById('empty-cluster');
    if (!reps.length) return !!(empty && !empty.hidden && empty.offsetParent !== null) && 'empty';
    return 'others';
  }, id);
  const how = await outcome.jsonValue();
  if (EXPECT_EMPTY && how !== 'empty') {
    await until('the empty state once every replica has left', () => {
      const empty = document.getElementById('empty-cluster');
      return !document.querySelector('[data-replica-id]') && !!empty && !empty.hidden && empty.offsetParent !== null;
    });
    step('cluster is empty');
    await shot('cluster-empty.png');
    return;
  }
  if (how === 'empty') step('cluster is empty');
  else step(`replica ${id} left; other replicas remain listed (${await replicaStates()}), so no empty state expected`);
  await shot('cluster-empty.png');
}

async function main() {
  if (SHOTS) fs.mkdirSync(SHOTS, { recursive: true });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: WAIT_MS,
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.on('pageerror', (e) => rejectProblem(new Error(`uncaught page error: ${e.message}`)));
  page.on('console', (m) => {
    if (m.type() === 'error' && /Content Security Policy/i.test(m.text())) rejectProblem(new Error(`CSP violation: ${m.text()}`));
  });

  step(`open ${URL}`);
  await page.goto(URL, { waitUntil: 'load', timeout: WAIT_MS });
  await stepKey();
  await stepCluster();
  await stepPlayground();
  await stepTraffic();
  await stepKill();
  await stepRestart();
  await stepDrain();
}

const runLimit = setTimeout(() => fail(`the run took longer than ${RUN_LIMIT_MS / 1000} s`), RUN_LIMIT_MS);
Promise.race([main(), problem])
  .then(async () => {
    step('all steps passed');
    clearTimeout(runLimit);
    await withTimeout(browser.close(), 10000, 'browser close').catch(() => {});
    process.exit(0);
  })
  .catch((e) => fail(e && e.message ? e.message : e));
