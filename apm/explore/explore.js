// apm explore: the page's whole code. It reads the JSON block "apm-data" written by
// apm/explore/page.py and nothing else: no server, no network. Click a pixel of any picture and
// the island holding it is highlighted at every level, for every source, and for every annotator.
"use strict";
(function () {
  const started = performance.now();
  const D = JSON.parse(document.getElementById("apm-data").textContent);
  const S = D.size;
  const NAMES = { teacher: "teacher", student: "student", fitted: "fitted to this photograph" };
  const PALETTE = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207], [174, 199, 232],
    [255, 187, 120], [152, 223, 138], [255, 152, 150], [197, 176, 213], [196, 156, 148],
    [247, 182, 210], [199, 199, 199], [219, 219, 141], [158, 218, 229]];
  const HIGHLIGHT = [255, 221, 0], FILL = [255, 255, 255], DIM = 0.5;
  const state = { photo: 0, k: D.k, opacity: 0.5, px: null };
  const labelCache = new Map();
  const photoPixels = new Map();
  let panels = [];
  const $ = (id) => document.getElementById(id);

  function colour(label) {
    if (label < PALETTE.length) return PALETTE[label];
    const h = (label * 2654435761) >>> 0;  // islands beyond the palette: a hashed colour
    return [h & 255, (h >> 8) & 255, (h >> 16) & 255];
  }

  function decode(runs, n) {  // [label, length, label, length, ...] -> Int32Array(n)
    const out = new Int32Array(n);
    let j = 0;
    for (let i = 0; i < runs.length; i += 2) { out.fill(runs[i], j, j + runs[i + 1]); j += runs[i + 1]; }
    return out;
  }

  function upsample(cells, h, w) {  // nearest cell at each pixel centre (apm.segment.upsample_labels)
    const rows = new Int32Array(S), cols = new Int32Array(S), out = new Int32Array(S * S);
    for (let i = 0; i < S; i++) {
      rows[i] = Math.min(Math.floor((i + 0.5) * h / S), h - 1);
      cols[i] = Math.min(Math.floor((i + 0.5) * w / S), w - 1);
    }
    for (let y = 0; y < S; y++) for (let x = 0; x < S; x++) out[y * S + x] = cells[rows[y] * w + cols[x]];
    return out;
  }

  function islandLabels(source, level) {  // pixel labels (S * S) of the current photograph and k
    const key = [state.photo, source, level, state.k].join("|");
    if (!labelCache.has(key)) {
      const p = D.photos[state.photo];
      if (source === "people") {
        labelCache.set(key, decode(p.gt.maps[level], S * S));
      } else {
        const [h, w] = p.grids[source][level];
        labelCache.set(key, upsample(decode(p.maps[source][level][state.k], h * w), h, w));
      }
    }
    return labelCache.get(key);
  }

  function loadPhoto(index) {
    if (photoPixels.has(index)) return Promise.resolve(photoPixels.get(index));
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        const c = document.createElement("canvas");
        c.width = S; c.height = S;
        const ctx = c.getContext("2d");
        ctx.drawImage(img, 0, 0, S, S);
        photoPixels.set(index, ctx.getImageData(0, 0, S, S).data);
        resolve(photoPixels.get(index));
      };
      img.onerror = reject;
      img.src = D.photos[index].image;
    });
  }

  function makePanel(parent, id, tag, source, level, big) {
    const div = document.createElement("div");
    div.className = "panel" + (big ? " big" : "");
    const base = document.createElement("canvas"), hl = document.createElement("canvas");
    base.width = hl.width = base.height = hl.height = S;
    base.id = "base-" + id; hl.id = "hl-" + id; hl.className = "hl";
    div.append(base, hl);
    if (tag) { const t = document.createElement("div"); t.className = "tag"; t.textContent = tag; div.append(t); }
    hl.addEventListener("click", (ev) => {
      const r = hl.getBoundingClientRect();
      const x = Math.min(S - 1, Math.max(0, Math.floor((ev.clientX - r.left) / r.width * S)));
      const y = Math.min(S - 1, Math.max(0, Math.floor((ev.clientY - r.top) / r.height * S)));
      select(x, y);
    });
    parent.append(div);
    const panel = { id, base, hl, source, level };
    panels.push(panel);
    return panel;
  }

  function drawBase(panel) {
    const photo = photoPixels.get(state.photo);
    const ctx = panel.base.getContext("2d"), img = ctx.createImageData(S, S), px = img.data;
    const labels = panel.source ? islandLabels(panel.source, panel.level) : null;
    const a = labels ? state.opacity : 0;
    const own = labels && state.px ? labels[state.px[1] * S + state.px[0]] : null;
    for (let i = 0; i < S * S; i++) {
      const c = labels ? colour(labels[i]) : HIGHLIGHT;
      const shade = own !== null && labels[i] !== own ? DIM : 1;  // the rest darker, the island stands out
      for (let ch = 0; ch < 3; ch++) px[4 * i + ch] = Math.round(shade * (photo[4 * i + ch] * (1 - a) + c[ch] * a));
      px[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  function drawHighlight(panel) {  // the island under the chosen pixel: its pixels, and only they, drawn
    const ctx = panel.hl.getContext("2d");
    ctx.clearRect(0, 0, S, S);
    if (!state.px) return;
    const [x0, y0] = state.px;
    if (!panel.source) {  // the photograph: a cross at the pixel
      ctx.fillStyle = "rgb(255,221,0)";
      ctx.fillRect(0, y0, S, 1); ctx.fillRect(x0, 0, 1, S);
      return;
    }
    const labels = islandLabels(panel.source, panel.level), own = labels[y0 * S + x0];
    const img = ctx.createImageData(S, S), px = img.data;
    for (let y = 0; y < S; y++) for (let x = 0; x < S; x++) {
      const i = y * S + x;
      if (labels[i] !== own) continue;
      const edge = x === 0 || y === 0 || x === S - 1 || y === S - 1 || labels[i - 1] !== own ||
        labels[i + 1] !== own || labels[i - S] !== own || labels[i + S] !== own;
      px.set(edge ? HIGHLIGHT : FILL, 4 * i);
      px[4 * i + 3] = edge ? 255 : 60;
    }
    ctx.putImageData(img, 0, 0);
  }

  function island(source, level) {  // the chosen pixel's island: label, mask, size
    const labels = islandLabels(source, level), own = labels[state.px[1] * S + state.px[0]];
    const mask = new Uint8Array(S * S);
    let size = 0;
    for (let i = 0; i < S * S; i++) if (labels[i] === own) { mask[i] = 1; size++; }
    return { label: own, mask, size };
  }

  function overlap(a, b) { let n = 0; for (let i = 0; i < a.length; i++) n += a[i] & b[i]; return n; }
  const pct = (n) => (100 * n / (S * S)).toFixed(1) + "%";

  function levelStats(level) {
    const p = D.photos[state.photo], k = String(state.k), parts = [];
    if (state.px) {
      const t = island("teacher", level);
      parts.push("island: teacher <b>" + pct(t.size) + "</b>");
      for (const s of D.sources.slice(1)) {
        const o = island(s, level), both = overlap(t.mask, o.mask);
        parts.push(s + " <b>" + pct(o.size) + "</b>, IoU with teacher <b>" +
          (both / (t.size + o.size - both)).toFixed(2) + "</b>");
      }
    }
    for (const s of D.sources.slice(1)) parts.push("ARI " + s + "/teacher " + p.ari[level][k][s].toFixed(2));
    if (p.gt) {
      parts.push("vs people (covering, ARI): " + D.sources.map((s) => {
        const m = p.gt.scores[s][level][k];
        return s + " " + m.covering.toFixed(2) + ", " + m.ari.toFixed(2);
      }).join("; "));
    }
    return parts.join("<br>");
  }

  function treeSvg() {  // per source, the chosen pixel's islands from the lowest level (bottom) up
    if (!state.px) return "<h2>parse tree</h2><div class='stats'>click a pixel</div>";
    const L = D.levels, step = 30, colW = 86, left = 58, top = 18, h = top + L.length * step;
    let svg = L.map((lv, j) => `<text x="2" y="${h - 9 - j * step}">${lv}</text>`).join("");
    D.sources.forEach((s, c) => {
      const x = left + 12 + c * colW, nodes = L.map((lv) => island(s, lv));
      svg += `<text x="${x - 10}" y="11">${s}</text>`;
      nodes.forEach((n, j) => {
        const y = h - 12 - j * step;
        if (j + 1 < nodes.length) {
          const inside = overlap(n.mask, nodes[j + 1].mask) / n.size;
          svg += `<line x1="${x}" y1="${y}" x2="${x}" y2="${y - step}" stroke="#888"` +
            ` stroke-width="${1 + 3 * inside}"/>`;
          svg += `<text x="${x + 4}" y="${y - step / 2 + 3}" fill="#777">${Math.round(100 * inside)}%</text>`;
        }
        const r = 3 + 9 * Math.sqrt(n.size / (S * S)), [cr, cg, cb] = colour(n.label);
        svg += `<circle cx="${x}" cy="${y}" r="${r.toFixed(1)}" fill="rgb(${cr},${cg},${cb})" stroke="#222"/>`;
        svg += `<text x="${x + 14}" y="${y + 3}">#${n.label} ${pct(n.size)}</text>`;
      });
    });
    return "<h2>parse tree (lowest level at the bottom)</h2><svg width='" + (left + D.sources.length * colW) +
      "' height='" + h + "'>" + svg + "</svg><div class='stats'>edge: the share of the lower island " +
      "inside the upper one</div>";
  }

  function build() {  // the panels of the current photograph
    panels = [];
    const p = D.photos[state.photo];
    $("main").innerHTML = "";
    makePanel($("main"), "photo", p.name + " (" + S + " px)", null, null, true);
    $("levels").innerHTML = "";
    for (const level of D.levels) {
      const card = document.createElement("div"), row = document.createElement("div");
      const stats = document.createElement("div");
      card.className = "card"; row.className = "row"; stats.className = "stats"; stats.id = "stats-" + level;
      const grids = [...new Set(D.sources.map((s) => p.grids[s][level].join("x")))].join(", ");
      card.innerHTML = "<h2>" + level + " <span class='tag'>" + grids + " grid</span></h2>";
      for (const s of D.sources) makePanel(row, s + "-" + level, NAMES[s], s, level, false);
      card.append(row, stats);
      $("levels").append(card);
    }
    const people = $("people");
    people.innerHTML = "";
    people.style.display = p.gt ? "" : "none";
    if (p.gt) {
      people.innerHTML = "<h2>people (ground truth)</h2>";
      const row = document.createElement("div");
      row.className = "row"; row.style.flexWrap = "wrap";
      p.gt.maps.forEach((_, a) => makePanel(row, "people-" + a, "annotator " + (a + 1), "people", a, false));
      people.append(row);
    }
    const fit = p.fit ? `; fitted: R² ${p.fit.r2_mean_before.toFixed(2)} → ${p.fit.r2_mean_after.toFixed(2)}` +
      ` in ${p.fit.steps} steps` : "";
    $("note").textContent = `k-means islands at k = ${D.ks.join(", ")} (one seed); ` +
      `a student's islands take the colour of ` +
      `the teacher island they match best${fit}. ${D.note || ""}`;
  }

  function redraw(bases) {
    if (bases) panels.forEach(drawBase);
    panels.forEach(drawHighlight);
    for (const level of D.levels) $("stats-" + level).innerHTML = levelStats(level);
    $("tree").innerHTML = treeSvg();
    document.querySelectorAll("#kbuttons button").forEach(
      (b) => b.classList.toggle("on", Number(b.dataset.k) === state.k));
    const name = D.photos[state.photo].name;
    $("readout").textContent = state.px ? `${name}: pixel (x ${state.px[0]}, y ${state.px[1]}), k = ${state.k}`
      : "click a pixel of any picture";
  }

  function select(x, y) { state.px = [x, y]; redraw(true); }
  function setK(k) { state.k = Number(k); redraw(true); }
  function setOpacity(v) { state.opacity = Number(v) / 100; panels.forEach(drawBase); }
  function setPhoto(i) {
    state.photo = Number(i);
    return loadPhoto(state.photo).then(() => { build(); redraw(true); });
  }

  D.photos.forEach((p, i) => $("photo").append(new Option(p.name, i)));
  $("photo").addEventListener("change", (ev) => setPhoto(ev.target.value));
  for (const k of D.ks) {
    const b = document.createElement("button");
    b.textContent = k; b.dataset.k = k;
    b.addEventListener("click", () => setK(k));
    $("kbuttons").append(b);
  }
  $("opacity").addEventListener("input", (ev) => setOpacity(ev.target.value));
  window.apmExplore = { ready: false, state, select, setK, setPhoto, setOpacity };
  setPhoto(0).then(() => {
    window.apmExplore.loadMs = performance.now();  // since the navigation began
    window.apmExplore.scriptMs = performance.now() - started;
    window.apmExplore.ready = true;
  });
})();
