// sirocco console: a small single-page dashboard over the router's JSON API.
// No framework and no build step. The page runs under a strict CSP, so:
// no inline scripts or handlers, no style attributes (only CSSOM via el.style),
// and server-provided text only ever goes through textContent.
'use strict';

(() => {
  // ---------------------------------------------------------------- helpers

  const $ = (id) => document.getElementById(id);
  const SVG_NS = 'http://www.w3.org/2000/svg';

  /** Creates an element with an optional class and text. */
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  /** Creates an SVG element with attributes (never data-derived markup). */
  function svg(tag, attrs) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const isNum = (v) => typeof v === 'number' && Number.isFinite(v);

  /** Formats a number compactly: more decimals for small values. */
  function fmtNum(v, digits) {
    if (!isNum(v)) return '—';
    const abs = Math.abs(v);
    const d = digits !== undefined ? digits : abs >= 100 ? 0 : abs >= 10 ? 1 : abs === 0 ? 0 : 2;
    return v.toLocaleString('en-US', { minimumFractionDigits: d, maximumFractionDigits: d });
  }

  const fmtInt = (v) => (isNum(v) ? Math.round(v).toLocaleString('en-US') : '—');

  function fmtMs(v) {
    if (!isNum(v)) return '—';
    if (v >= 10000) return fmtNum(v / 1000, 1) + ' s';
    return fmtNum(v, v >= 100 || Number.isInteger(v) ? 0 : 1) + ' ms';
  }

  function fmtClock(ms) {
    const d = new Date(ms);
    return d.toLocaleTimeString('en-GB', { hour: '2-digit', minute: '2-digit' });
  }

  // ------------------------------------------------------------ API + key

  // The key lives in sessionStorage only: it survives reloads of this tab but
  // is never written into the page or shared with other tabs.
  const KEY_STORE = 'sirocco.apiKey';

  function getKey() {
    try { return sessionStorage.getItem(KEY_STORE) || null; } catch (_) { return null; }
  }

  function setKey(k) {
    try {
      if (k) sessionStorage.setItem(KEY_STORE, k);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (_) { /* storage disabled: the key then lasts until reload only */ }
    memoryKey = k || null;
  }

  let memoryKey = null;
  const currentKey = () => getKey() || memoryKey;

  /** The server could not be reached (or did not answer in time). */
  class NetError extends Error {}

  /** The server answered with a non-2xx status and an OpenAI-shaped error. */
  class ApiError extends Error {
    constructor(status, message, type) {
      super(message);
      this.status = status;
      this.type = type;
    }
  }

  /** Reads `{"error": {"message"}}` from a failed response, or falls back to the status. */
  async function errorOf(res) {
    let message = `HTTP ${res.status} ${res.statusText || ''}`.trim();
    let type = null;
    try {
      const body = await res.json();
      if (body && body.error && typeof body.error.message === 'string') {
        message = body.error.message;
        type = body.error.type || null;
      }
    } catch (_) { /* not JSON: keep the status line */ }
    return new ApiError(res.status, message, type);
  }

  function authHeaders(extra, key) {
    const h = new Headers(extra || {});
    if (key) h.set('Authorization', 'Bearer ' + key);
    return h;
  }

  /**
   * fetch() with the stored key. A 401 opens the key dialog and retries once
   * a key is saved, so every caller just sees the eventual answer.
   * `timeoutMs` bounds how long we wait for the response headers.
   */
  async function api(path, opts = {}) {
    for (;;) {
      const key = currentKey();
      const init = { method: opts.method || 'GET', headers: authHeaders(opts.headers, key), cache: 'no-store' };
      if (opts.body !== undefined) init.body = opts.body;
      const signals = [];
      if (opts.signal) signals.push(opts.signal);
      if (opts.timeoutMs) signals.push(AbortSignal.timeout(opts.timeoutMs));
      if (signals.length) init.signal = signals.length === 1 ? signals[0] : AbortSignal.any(signals);
      let res;
      try {
        res = await fetch(path, init);
      } catch (e) {
        if (opts.signal && opts.signal.aborted) throw e; // the caller aborted: not a network fault
        throw new NetError(e && e.name === 'TimeoutError' ? 'request timed out' : 'network error');
      }
      setConnected(true);
      if (res.status !== 401) return res;
      const err = await errorOf(res);
      // Only show the server's message when a key was actually sent (it was wrong).
      await askKey(key ? err.message : null);
    }
  }

  /** GET/POST returning parsed JSON, throwing ApiError for non-2xx. */
  async function apiJson(path, opts) {
    const res = await api(path, opts);
    if (!res.ok) throw await errorOf(res);
    return res.json();
  }

  // The key dialog is shared: concurrent 401s all wait on one prompt.
  let keyPrompt = null;

  function askKey(message) {
    showKeyError(message);
    if (!keyPrompt) {
      keyPrompt = {};
      keyPrompt.promise = new Promise((resolve) => { keyPrompt.resolve = resolve; });
      openKeyDialog(true);
    }
    return keyPrompt.promise;
  }

  function showKeyError(message) {
    const box = $('api-key-error');
    box.textContent = message || '';
    box.hidden = !message;
  }

  /** `required`: opened by a 401, so it cannot be dismissed without a key. */
  function openKeyDialog(required) {
    const dlg = $('key-dialog');
    $('key-reason').textContent = required
      ? 'This router requires an API key. It is kept in this tab\u2019s session storage only.'
      : 'Change or forget the API key used by this tab (kept in session storage only).';
    $('api-key-cancel').hidden = required;
    $('api-key-forget').hidden = required || !currentKey();
    $('api-key').value = '';
    if (!dlg.open) dlg.showModal();
    $('api-key').focus();
  }

  /** Checks a key against the server before keeping it, so a wrong one stays in the dialog. */
  async function saveKey(ev) {
    ev.preventDefault();
    const key = $('api-key').value.trim();
    if (!key) { showKeyError('Enter a key.'); return; }
    const save = $('api-key-save');
    save.disabled = true;
    try {
      const res = await fetch('v1/models', { headers: authHeaders(null, key), cache: 'no-store', signal: AbortSignal.timeout(10000) });
      if (res.status === 401) { showKeyError((await errorOf(res)).message); return; }
    } catch (_) {
      // Unreachable: keep the key anyway; the next 401 will bring the dialog back.
    } finally {
      save.disabled = false;
    }
    setKey(key);
    closeKeyDialog();
  }

  function closeKeyDialog() {
    showKeyError(null);
    const dlg = $('key-dialog');
    if (dlg.open) dlg.close();
    if (keyPrompt) {
      const p = keyPrompt;
      keyPrompt = null;
      p.resolve();
    }
  }

  function setupKeyDialog() {
    $('key-form').addEventListener('submit', saveKey);
    $('api-key-cancel').addEventListener('click', () => { if (!keyPrompt) closeKeyDialog(); });
    $('api-key-forget').addEventListener('click', () => { setKey(null); closeKeyDialog(); });
    $('key-button').addEventListener('click', () => openKeyDialog(!!keyPrompt));
    // Escape would close a required dialog and leave callers waiting forever.
    $('key-dialog').addEventListener('cancel', (ev) => { if (keyPrompt) ev.preventDefault(); });
  }

  // ------------------------------------------------------- connection state

  let connected = null;

  /** Shows the banner and header indicator; the banner goes away once a call succeeds. */
  function setConnected(ok) {
    if (connected === ok) return;
    connected = ok;
    $('conn-banner').hidden = ok;
    document.body.classList.toggle('offline', !ok);
    const ind = $('conn-status');
    ind.dataset.conn = ok ? 'live' : 'offline';
    ind.querySelector('.conn-text').textContent = ok ? 'Live' : 'Offline';
  }

  /**
   * Runs `task` every `intervalMs` while enabled. Network failures back off
   * (1, 2, 4, 5 s: never longer than 5 s) so the banner clears soon after the
   * router is back. `now()` runs it right away (e.g. after an action).
   */
  function poller(task, intervalMs) {
    let enabled = false;
    let timer = null;
    let running = false;
    let failures = 0;

    async function tick() {
      timer = null;
      if (!enabled || running) return;
      running = true;
      let delay = intervalMs;
      try {
        await task();
        failures = 0;
      } catch (e) {
        if (e instanceof NetError) {
          setConnected(false);
          failures += 1;
          delay = Math.min(5000, 1000 * 2 ** (failures - 1));
        } else {
          console.warn('poll failed:', e && e.message);
        }
      } finally {
        running = false;
      }
      if (enabled && !timer) timer = setTimeout(tick, delay);
    }

    return {
      start() { if (!enabled) { enabled = true; tick(); } },
      stop() { enabled = false; if (timer) { clearTimeout(timer); timer = null; } },
      now() { if (timer) { clearTimeout(timer); timer = null; } if (enabled) tick(); },
    };
  }

  // ---------------------------------------------------------------- cluster

  const POLL_TIMEOUT_MS = 8000;
  const cards = new Map(); // replica id -> { root, refs }
  let lastCluster = null;

  async function pollCluster() {
    try {
      const c = await apiJson('v1/cluster', { timeoutMs: POLL_TIMEOUT_MS });
      showNotice('cluster-error', null);
      renderCluster(c);
    } catch (e) {
      if (e instanceof ApiError) showNotice('cluster-error', 'Could not load the cluster: ' + e.message);
      throw e;
    }
  }

  function showNotice(id, message) {
    const n = $(id);
    n.textContent = message || '';
    n.hidden = !message;
  }

  function renderCluster(c) {
    lastCluster = c;
    const reps = Array.isArray(c.replicas) ? c.replicas : [];
    $('cluster-loading').hidden = true;
    renderSummary(c, reps);
    $('empty-cluster').hidden = reps.length > 0;

    const seen = new Set();
    const list = $('replicas');
    // Replicas membership lists but the router does not serve with (starting) have
    // no id yet: they are keyed by name and listed after the served ones.
    const key = (r) => (isNum(r.id) ? `id:${r.id}` : `name:${r.name}`);
    const order = (r) => (isNum(r.id) ? r.id : Number.MAX_SAFE_INTEGER);
    reps.slice().sort((a, b) => order(a) - order(b)).forEach((r, i) => {
      const k = key(r);
      seen.add(k);
      let card = cards.get(k);
      if (!card) {
        card = createReplicaCard(isNum(r.id) ? r.id : null);
        cards.set(k, card);
      }
      updateReplicaCard(card, r, c.model);
      // Only move nodes when the order changed, so clicks are not disturbed.
      if (list.children[i] !== card.root) list.insertBefore(card.root, list.children[i] || null);
    });
    for (const [id, card] of cards) {
      if (!seen.has(id)) { card.root.remove(); cards.delete(id); }
    }
  }

  function renderSummary(c, reps) {
    const ready = reps.filter((r) => r.state === 'ready').length;
    const sumRep = $('sum-replicas');
    sumRep.textContent = `${ready} / ${reps.length}`;
    sumRep.classList.toggle('warn', reps.length > 0 && ready < reps.length);
    sumRep.classList.toggle('bad', reps.length === 0 || ready === 0);

    const q = c.queue || {};
    const sumQ = $('sum-queue');
    sumQ.replaceChildren(document.createTextNode(fmtInt(q.waiting)));
    if (isNum(q.limit)) sumQ.append(el('span', 'tile-sub', ` / ${fmtInt(q.limit)} limit`));

    const disc = $('sum-discovery');
    disc.classList.remove('ok', 'bad');
    if (c.discovery === 'etcd' && c.etcd) {
      const endpoints = (c.etcd.endpoints || []).join(', ');
      disc.title = endpoints;
      if (c.etcd.reachable) {
        disc.textContent = 'etcd: reachable';
        disc.classList.add('ok');
      } else {
        disc.textContent = 'etcd: unreachable — ' + (c.etcd.error || 'unknown error');
        disc.classList.add('bad');
      }
    } else {
      disc.textContent = c.discovery ? String(c.discovery) : '—';
      disc.title = '';
    }

    const m = c.model || {};
    $('model-name').textContent = m.name || '';
    $('model-name').hidden = !m.name;
    const parts = [m.name || '—'];
    if (isNum(m.tp)) parts.push(`TP ${m.tp}`);
    if (isNum(m.max_context)) parts.push(`ctx ${fmtInt(m.max_context)}`);
    if (isNum(m.sliding_window)) parts.push(`window ${fmtInt(m.sliding_window)}`);
    if (isNum(m.kv_block_size)) parts.push(`block ${m.kv_block_size}`);
    const sumModel = $('sum-model');
    sumModel.replaceChildren(document.createTextNode(parts.join(' · ')));
    if (m.fingerprint) {
      const fp = el('code', 'fp', shortFp(m.fingerprint));
      fp.title = m.fingerprint;
      sumModel.append(' · ', fp);
    }
  }

  const shortFp = (fp) => (fp && fp.length > 12 ? fp.slice(0, 12) + '…' : fp || '—');

  /** Builds a replica card once; later polls only update its fields. */
  function createReplicaCard(id) {
    const root = el('article', 'replica');
    root.dataset.replicaId = id === null ? '' : String(id);

    const head = el('div', 'replica-head');
    const title = el('div', 'replica-title');
    const idEl = el('span', 'replica-id', id === null ? 'Replica' : `Replica ${id}`);
    const name = el('span', 'replica-name');
    const badge = el('span', 'badge');
    const fp = el('code', 'fp');
    title.append(idEl, name, badge, fp);
    const drain = el('button', 'btn btn-small btn-danger-ghost drain', 'Drain');
    drain.type = 'button';
    drain.addEventListener('click', () => drainReplica(id));
    head.append(title, drain);

    const metrics = el('div', 'metrics');
    const mRunning = metric(metrics, 'Running');
    const mKv = metric(metrics, 'KV cache');
    mKv.classList.add('metric-kv');
    const mSteps = metric(metrics, 'Steps');
    const mLast = metric(metrics, 'Last step');

    const error = el('div', 'replica-error');
    error.hidden = true;

    const table = el('table', 'ranks');
    const thead = el('thead');
    const hr = el('tr');
    for (const h of ['Rank', 'Address', 'State', 'KV used / capacity', 'Sequences', 'Cached blocks']) hr.append(el('th', null, h));
    thead.append(hr);
    const tbody = el('tbody');
    table.append(thead, tbody);

    root.append(head, metrics, error, table);
    return { root, refs: { name, badge, fp, drain, mRunning, mKv, mSteps, mLast, error, tbody } };
  }

  function metric(parent, label) {
    const box = el('div', 'metric');
    box.append(el('div', 'metric-label', label));
    const value = el('div', 'metric-value');
    box.append(value);
    parent.append(box);
    return value;
  }

  function updateReplicaCard(card, r, model) {
    const { root, refs } = card;
    const state = String(r.state || 'unknown');
    root.dataset.state = state;
    refs.name.textContent = r.name ? r.name : '';
    refs.name.hidden = !r.name;
    setBadge(refs.badge, state);

    refs.fp.textContent = shortFp(r.fingerprint);
    refs.fp.title = r.fingerprint || '';
    const mismatch = !!(model && model.fingerprint && r.fingerprint && r.fingerprint !== model.fingerprint);
    refs.fp.classList.toggle('mismatch', mismatch);
    if (mismatch) refs.fp.title += ' (differs from the router\u2019s model)';

    // Only a replica the router serves with (it has an id) and that is ready can drain.
    refs.drain.hidden = !isNum(r.id) || state !== 'ready';

    refs.mRunning.textContent = fmtInt(r.running);
    refs.mKv.replaceChildren(kvBar(r.kv_used_tokens, r.kv_capacity_tokens));
    refs.mSteps.textContent = fmtInt(r.steps);
    refs.mLast.textContent = isNum(r.last_step_ms_ago)
      ? `${fmtMs(r.last_step_ms_ago)} ago · took ${fmtMs(r.last_step_duration_ms)}`
      : 'no step yet';

    refs.error.textContent = r.error || '';
    refs.error.hidden = !r.error;

    const rows = (Array.isArray(r.ranks) ? r.ranks : []).map(rankRow);
    refs.tbody.replaceChildren(...rows);
  }

  function rankRow(k) {
    const tr = el('tr');
    tr.dataset.rank = String(k.rank);
    tr.dataset.state = String(k.state || 'unknown');
    const state = el('td');
    const b = el('span', 'badge badge-small');
    setBadge(b, String(k.state || 'unknown'));
    state.append(b);
    const kv = el('td');
    kv.append(kvBar(k.kv_used_tokens, k.kv_capacity_tokens, true));
    tr.append(
      el('td', 'num', k.rank),
      el('td', 'addr', k.addr || '—'),
      state,
      kv,
      el('td', 'num', fmtInt(k.sequences)),
      el('td', 'num', fmtInt(k.cached_blocks)),
    );
    return tr;
  }

  function setBadge(b, state) {
    b.textContent = state;
    b.dataset.badge = ['starting', 'ready', 'draining', 'failed'].includes(state) ? state : 'unknown';
  }

  /** A usage bar plus "used / capacity"; unknown usage shows as a dash. */
  function kvBar(used, cap, compact) {
    const wrap = el('div', compact ? 'kv kv-compact' : 'kv');
    const bar = el('div', 'bar');
    const fill = el('div', 'bar-fill');
    const frac = isNum(used) && isNum(cap) && cap > 0 ? Math.min(1, used / cap) : 0;
    fill.style.width = (frac * 100).toFixed(1) + '%'; // CSSOM, allowed by the CSP
    fill.classList.toggle('high', frac > 0.9);
    bar.append(fill);
    const text = isNum(used)
      ? `${fmtInt(used)} / ${fmtInt(cap)}${isNum(cap) && cap > 0 ? ` (${fmtNum(frac * 100, 1)}%)` : ''}`
      : `— / ${fmtInt(cap)}`;
    wrap.append(bar, el('span', 'kv-text', text));
    return wrap;
  }

  async function drainReplica(id) {
    const r = lastCluster && (lastCluster.replicas || []).find((x) => x.id === id);
    const label = r && r.name ? `replica ${id} (${r.name})` : `replica ${id}`;
    const ok = await confirmDialog(
      `Drain ${label}?`,
      'It stops taking new requests; requests already running finish, then it leaves the cluster.',
      'Drain',
    );
    if (!ok) return;
    try {
      await apiJson(`v1/replicas/${encodeURIComponent(id)}/drain`, { method: 'POST', timeoutMs: 15000 });
      showNotice('cluster-error', null);
    } catch (e) {
      showNotice('cluster-error', `Drain of ${label} failed: ${e.message}`);
    }
    clusterPoller.now();
  }

  /** An in-page confirmation (window.confirm cannot be styled or driven by tests). */
  function confirmDialog(title, text, okLabel) {
    const dlg = $('confirm-dialog');
    $('confirm-title').textContent = title;
    $('confirm-text').textContent = text;
    $('confirm-ok').textContent = okLabel || 'Confirm';
    return new Promise((resolve) => {
      const done = (v) => {
        $('confirm-ok').removeEventListener('click', onOk);
        $('confirm-cancel').removeEventListener('click', onCancel);
        dlg.removeEventListener('cancel', onCancel);
        if (dlg.open) dlg.close();
        resolve(v);
      };
      const onOk = () => done(true);
      const onCancel = (ev) => { if (ev) ev.preventDefault(); done(false); };
      $('confirm-ok').addEventListener('click', onOk);
      $('confirm-cancel').addEventListener('click', onCancel);
      dlg.addEventListener('cancel', onCancel);
      dlg.showModal();
      $('confirm-cancel').focus(); // the safe choice gets the focus
    });
  }

  // ---------------------------------------------------------------- traffic

  const pct = (v) => (isNum(v) ? v * 100 : null);
  const field = (o, k) => (o && isNum(o[k]) ? o[k] : null);

  // What to chart: each series reads one value (or null for a gap) from a sample.
  const CHARTS = [
    { id: 'output-tps', title: 'Output tokens/s', series: [{ label: 'tokens/s', get: (s) => s.output_tokens_per_s }] },
    { id: 'rps', title: 'Requests/s', series: [{ label: 'req/s', get: (s) => s.requests_per_s }] },
    { id: 'ttft', title: 'Time to first token (ms)', series: [
      { label: 'p50', get: (s) => field(s.ttft_ms, 'p50') },
      { label: 'p99', get: (s) => field(s.ttft_ms, 'p99') }] },
    { id: 'itl', title: 'Inter-token latency (ms)', series: [
      { label: 'p50', get: (s) => field(s.itl_ms, 'p50') },
      { label: 'p99', get: (s) => field(s.itl_ms, 'p99') }] },
    { id: 'queue', title: 'Queue depth & running', series: [
      { label: 'queue', get: (s) => s.queue_depth },
      { label: 'running', get: (s) => s.running }] },
    { id: 'prefix-hit', title: 'Prefix-cache hit rate (%)', fixedMax: 100, series: [
      { label: 'hit %', get: (s) => pct(s.prefix_cache_hit_rate) }] },
  ];

  async function pollTraffic() {
    try {
      const t = await apiJson('v1/traffic', { timeoutMs: POLL_TIMEOUT_MS });
      showNotice('traffic-error', null);
      renderTraffic(t);
    } catch (e) {
      if (e instanceof ApiError) showNotice('traffic-error', 'Could not load traffic: ' + e.message);
      throw e;
    }
  }

  function renderTraffic(t) {
    const samples = Array.isArray(t.samples) ? t.samples : [];
    $('traffic-empty').hidden = samples.length > 0;
    $('traffic-meta').textContent = samples.length
      ? `${samples.length} sample${samples.length === 1 ? '' : 's'} · every ${t.interval_s} s · last ${Math.round((t.window_s || 0) / 60)} min`
      : '';
    const box = $('charts');
    if (!samples.length) { box.replaceChildren(); return; }
    // The window ends at the newest sample and spans window_s before it.
    const end = samples[samples.length - 1].time_unix_ms;
    const start = end - (t.window_s || 900) * 1000;
    box.replaceChildren(...CHARTS.map((def) => chart(def, samples, start, end)));
  }

  const CHART_W = 400;
  const CHART_H = 150;
  const PAD = { left: 44, right: 10, top: 10, bottom: 22 };

  /** One chart card: title, last value per series, an SVG line chart, min/max. */
  function chart(def, samples, start, end) {
    const series = def.series.map((s, i) => ({
      label: s.label,
      cls: `s${i}`,
      points: samples.map((x) => {
        const v = s.get(x);
        return { t: x.time_unix_ms, v: isNum(v) ? v : null };
      }),
    }));
    const values = series.flatMap((s) => s.points.filter((p) => p.v !== null).map((p) => p.v));
    const root = el('div', 'chart');
    root.dataset.chart = def.id;
    root.dataset.points = String(values.length);

    const head = el('div', 'chart-head');
    head.append(el('div', 'chart-title', def.title));
    const last = el('div', 'chart-last');
    for (const s of series) {
      const lastPt = s.points[s.points.length - 1];
      const item = el('span', `legend ${s.cls}`);
      item.append(el('span', 'swatch'), `${s.label} `, el('b', null, lastPt && lastPt.v !== null ? fmtNum(lastPt.v) : '—'));
      last.append(item);
    }
    head.append(last);

    const min = values.length ? Math.min(...values) : 0;
    const max = values.length ? Math.max(...values) : 0;
    const yMax = def.fixedMax || niceMax(max);
    root.append(head, drawChart(series, start, end, yMax));

    const foot = el('div', 'chart-foot');
    foot.textContent = values.length ? `min ${fmtNum(min)} · max ${fmtNum(max)}` : 'no data in this window';
    root.append(foot);
    return root;
  }

  /** Rounds the axis top up to 1, 2, 2.5 or 5 × 10^k so labels read well. */
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = 10 ** Math.floor(Math.log10(v));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  function drawChart(series, start, end, yMax) {
    const w = CHART_W - PAD.left - PAD.right;
    const h = CHART_H - PAD.top - PAD.bottom;
    const x = (t) => PAD.left + ((t - start) / Math.max(1, end - start)) * w;
    const y = (v) => PAD.top + h - (Math.min(v, yMax) / yMax) * h;
    const root = svg('svg', { viewBox: `0 0 ${CHART_W} ${CHART_H}`, class: 'chart-svg', role: 'img' });

    // Grid and y labels at 0, half and max.
    for (const f of [0, 0.5, 1]) {
      const gy = PAD.top + h - f * h;
      root.append(svg('line', { x1: PAD.left, x2: PAD.left + w, y1: gy, y2: gy, class: f === 0 ? 'axis' : 'grid' }));
      const label = svg('text', { x: PAD.left - 6, y: gy + 3.5, 'text-anchor': 'end', class: 'tick' });
      label.textContent = fmtNum(yMax * f);
      root.append(label);
    }
    // X labels: window start and end as wall-clock times.
    for (const [t, anchor] of [[start, 'start'], [end, 'end']]) {
      const label = svg('text', { x: x(t), y: CHART_H - 6, 'text-anchor': anchor, class: 'tick' });
      label.textContent = fmtClock(t);
      root.append(label);
    }

    for (const s of series) {
      // Nulls split the line into segments so gaps stay visible.
      let d = '';
      let pen = false;
      s.points.forEach((p, i) => {
        if (p.v === null || p.t < start) { pen = false; return; }
        d += `${pen ? 'L' : 'M'}${x(p.t).toFixed(1)} ${y(p.v).toFixed(1)}`;
        const next = s.points[i + 1];
        const prevNull = !pen;
        pen = true;
        // A point alone between gaps has no line: mark it with a dot.
        if (prevNull && (!next || next.v === null)) {
          root.append(svg('circle', { cx: x(p.t).toFixed(1), cy: y(p.v).toFixed(1), r: 2.2, class: `dot ${s.cls}` }));
        }
      });
      if (d) root.append(svg('path', { d, class: `line ${s.cls}` }));
    }
    return root;
  }

  // ------------------------------------------------------------- playground

  const chat = { history: [], busy: false, abort: null, modelId: null };

  async function modelId() {
    if (!chat.modelId) {
      const m = await apiJson('v1/models', { timeoutMs: 15000 });
      const first = m && Array.isArray(m.data) && m.data[0];
      if (!first || !first.id) throw new Error('the router lists no model');
      chat.modelId = first.id;
      $('model-id').textContent = first.id;
    }
    return chat.modelId;
  }

  /** Reads the sampling controls; blank or unparsable optional fields are left out. */
  function samplingParams() {
    const p = {};
    const num = (id, parse) => {
      const raw = $(id).value.trim();
      if (raw === '') return null;
      const v = parse(raw);
      return Number.isFinite(v) ? v : null;
    };
    const temperature = num('temperature', parseFloat);
    const topP = num('top-p', parseFloat);
    const maxTokens = num('max-tokens', (s) => parseInt(s, 10));
    const seed = num('seed', (s) => parseInt(s, 10));
    if (temperature !== null) p.temperature = temperature;
    if (topP !== null) p.top_p = topP;
    if (maxTokens !== null) p.max_tokens = maxTokens;
    if (seed !== null) p.seed = seed;
    const stop = $('stop-seq').value;
    if (stop !== '') p.stop = stop;
    return p;
  }

  function addMessage(role, text) {
    $('transcript-empty').hidden = true;
    const m = el('div', `msg ${role}`);
    m.append(el('div', 'msg-role', role === 'user' ? 'You' : 'Assistant'));
    const content = el('div', 'msg-content');
    // One text node that grows with appendData: cheap, and each token is one DOM change.
    const node = document.createTextNode(text || '');
    content.append(node);
    m.append(content);
    $('transcript').append(m);
    scrollTranscript();
    return { root: m, content, node };
  }

  function scrollTranscript() {
    const t = $('transcript');
    t.scrollTop = t.scrollHeight;
  }

  function setBusy(busy) {
    chat.busy = busy;
    $('send').disabled = busy;
    $('stop').disabled = !busy;
  }

  async function send(ev) {
    if (ev) ev.preventDefault();
    const text = $('prompt').value.trim();
    if (!text || chat.busy) return;
    $('prompt').value = '';
    setBusy(true);
    addMessage('user', text);
    const answer = addMessage('assistant', '');
    answer.root.classList.add('streaming');
    chat.abort = new AbortController();
    const t0 = performance.now();
    let outcome;
    try {
      const messages = [];
      const system = $('system-prompt').value.trim();
      if (system) messages.push({ role: 'system', content: system });
      messages.push(...chat.history, { role: 'user', content: text });
      const body = {
        model: await modelId(),
        messages,
        stream: true,
        stream_options: { include_usage: true },
        ...samplingParams(),
      };
      const res = await api('v1/chat/completions', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
        body: JSON.stringify(body),
        signal: chat.abort.signal,
      });
      if (!res.ok) throw await errorOf(res);
      outcome = await readStream(res, answer, t0);
    } catch (e) {
      outcome = { error: chat.abort.signal.aborted ? null : e.message || String(e), stopped: chat.abort.signal.aborted };
      if (e instanceof NetError) outcome.error = 'Cannot reach the router: ' + e.message;
    }
    finishAnswer(answer, text, outcome, t0);
    setBusy(false);
    chat.abort = null;
    $('prompt').focus();
  }

  /**
   * Reads the SSE body line by line. Returns what happened: usage, when the
   * first token came, finish reason, and an error message if the stream
   * reported one or ended before [DONE].
   */
  async function readStream(res, answer, t0) {
    const out = { usage: null, tFirst: null, tLast: null, finish: null, error: null, stopped: false, chunks: 0 };
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    let done = false;
    try {
      while (!done) {
        const { value, done: eof } = await reader.read();
        if (eof) break;
        buf += value;
        let nl;
        while (!done && (nl = buf.indexOf('\n')) >= 0) {
          const line = buf.slice(0, nl).replace(/\r$/, '');
          buf = buf.slice(nl + 1);
          done = handleSseLine(line, answer, out, t0);
        }
      }
      if (!done && !out.error) out.error = 'The stream ended before [DONE].';
    } catch (e) {
      if (chat.abort && chat.abort.signal.aborted) out.stopped = true;
      else out.error = 'The stream broke: ' + (e.message || e);
    } finally {
      reader.cancel().catch(() => {});
    }
    return out;
  }

  /** Handles one SSE line; returns true when the stream is over. */
  function handleSseLine(line, answer, out, t0) {
    if (!line.startsWith('data:')) return false; // blank separators, comments, event names
    const data = line.slice(5).trim();
    if (data === '[DONE]') return true;
    let chunk;
    try { chunk = JSON.parse(data); } catch (_) { return false; }
    if (chunk.error) {
      out.error = (chunk.error && chunk.error.message) || 'The server reported an error.';
      return true;
    }
    const choice = Array.isArray(chunk.choices) && chunk.choices[0];
    const delta = choice && choice.delta && choice.delta.content;
    if (typeof delta === 'string' && delta.length) {
      const now = performance.now();
      if (out.tFirst === null) out.tFirst = now - t0;
      out.tLast = now - t0;
      out.chunks += 1;
      answer.node.appendData(delta);
      scrollTranscript();
    }
    if (choice && choice.finish_reason) out.finish = choice.finish_reason;
    if (chunk.usage) out.usage = chunk.usage;
    return false;
  }

  function finishAnswer(answer, userText, out, t0) {
    answer.root.classList.remove('streaming');
    const content = answer.node.data;
    if (out.error) {
      answer.root.classList.add('failed');
      answer.root.append(el('div', 'error', out.error));
    }
    if (!out.error || content) answer.root.append(statsLine(out, performance.now() - t0));
    if (out.stopped) answer.root.classList.add('stopped');
    // Only exchanges with an answer are sent back as history.
    if (content && !out.error) {
      chat.history.push({ role: 'user', content: userText }, { role: 'assistant', content });
    }
    scrollTranscript();
  }

  /** The answer's stats; the data-* attributes carry raw numbers for tests. */
  function statsLine(out, totalMs) {
    const s = el('div', 'stats');
    const u = out.usage || {};
    const cached = u.prompt_tokens_details && isNum(u.prompt_tokens_details.cached_tokens)
      ? u.prompt_tokens_details.cached_tokens : null;
    // Decode speed: tokens after the first over the time they took.
    const n = isNum(u.completion_tokens) ? u.completion_tokens : out.chunks;
    const tps = n > 1 && out.tLast > out.tFirst ? ((n - 1) * 1000) / (out.tLast - out.tFirst) : null;
    const items = [['TTFT', fmtMs(out.tFirst), 'ttft-ms', out.tFirst]];
    // Token counts come from the usage chunk only (a stopped stream has none).
    if (isNum(u.prompt_tokens)) items.push(['prompt', fmtInt(u.prompt_tokens), 'prompt-tokens', u.prompt_tokens]);
    if (isNum(u.completion_tokens)) items.push(['completion', fmtInt(u.completion_tokens), 'completion-tokens', u.completion_tokens]);
    if (cached !== null) items.push(['cached', fmtInt(cached), 'cached-tokens', cached]);
    items.push(['speed', tps === null ? '—' : `${fmtNum(tps, 1)} tok/s`, 'tokens-per-s', tps]);
    items.push(['total', fmtMs(totalMs), 'total-ms', totalMs]);
    if (out.finish) items.push(['finish', out.finish, 'finish', out.finish]);
    if (out.stopped) items.push(['', 'stopped', 'stopped', 'true']);
    for (const [label, value, key, raw] of items) {
      // Spaces between flex items take no room but keep the text readable when copied.
      if (s.childNodes.length) s.append(' ');
      const item = el('span', 'stat');
      if (label) item.append(el('span', 'stat-label', label + ' '));
      item.append(el('span', 'stat-value', value));
      s.append(item);
      if (raw !== null && raw !== undefined) s.dataset[camel(key)] = isNum(raw) ? String(Math.round(raw * 10) / 10) : String(raw);
    }
    return s;
  }

  const camel = (k) => k.replace(/-([a-z])/g, (_, c) => c.toUpperCase());

  function clearChat() {
    if (chat.abort) chat.abort.abort();
    chat.history = [];
    const t = $('transcript');
    t.replaceChildren($('transcript-empty'));
    $('transcript-empty').hidden = false;
  }

  function setupPlayground() {
    $('composer').addEventListener('submit', send);
    $('stop').addEventListener('click', () => { if (chat.abort) chat.abort.abort(); });
    $('clear').addEventListener('click', clearChat);
    $('prompt').addEventListener('keydown', (ev) => {
      // Enter sends, Shift+Enter adds a line; not while an IME is composing.
      if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        $('composer').requestSubmit();
      }
    });
  }

  // ---------------------------------------------------------------- routing

  const VIEWS = ['cluster', 'traffic', 'playground'];
  const clusterPoller = poller(pollCluster, 2000);
  const trafficPoller = poller(pollTraffic, 5000);

  function route() {
    const name = location.hash.replace(/^#/, '');
    const view = VIEWS.includes(name) ? name : 'cluster';
    for (const v of VIEWS) {
      $(`view-${v}`).hidden = v !== view;
      const tab = $(`tab-${v}`);
      tab.setAttribute('aria-selected', String(v === view));
      tab.classList.toggle('active', v === view);
    }
    // Traffic is only fetched while visible; the cluster poll always runs
    // because it also drives the connection indicator.
    if (view === 'traffic') trafficPoller.start(); else trafficPoller.stop();
    if (view === 'playground') modelId().catch(() => {});
  }

  function init() {
    setupKeyDialog();
    setupPlayground();
    window.addEventListener('hashchange', route);
    route();
    clusterPoller.start();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
