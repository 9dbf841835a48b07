// Markdown -> DOM for model output. Safe by construction: all text goes in as text nodes
// (textContent), never through innerHTML, and links keep only absolute http(s)/mailto URLs.
// Covers what chat models write: headings, paragraphs, emphasis, inline code, fenced code
// blocks, nested lists, block quotes, tables, rules and links. An unclosed fence (an answer
// still streaming) renders as a code block so far.

import { el } from "./common.js";

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const LIST_ITEM = /^( *)([-*+]|\d{1,9}[.)])(?:\s+(.*))?$/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?\s*$/;
const LINK_SCHEMES = new Set(["http:", "https:", "mailto:"]);

/** Replace `target`'s children with the rendering of `text`. */
export function renderMarkdown(text, target) {
  const lines = String(text).replace(/\r\n?/g, "\n").replace(/\t/g, "    ").split("\n");
  target.replaceChildren(...parseBlocks(lines));
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || LIST_ITEM.test(line);
}

function parseBlocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      i++;
    } else if ((m = FENCE.exec(line))) {
      const close = new RegExp(`^ {0,3}${m[1][0] === "`" ? "`" : "~"}{${m[1].length},}\\s*$`);
      const body = [];
      for (i++; i < lines.length && !close.test(lines[i]); i++) body.push(lines[i]);
      i++;  // the closing fence, or past the end while streaming
      out.push(codeBlock(body.join("\n"), m[2]));
    } else if ((m = HEADING.exec(line))) {
      out.push(el(`h${m[1].length}`, {}, ...inline(m[2])));
      i++;
    } else if (RULE.test(line)) {
      out.push(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const inner = [];
      for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) inner.push(m[1]);
      out.push(el("blockquote", {}, ...parseBlocks(inner)));
    } else if (LIST_ITEM.test(line)) {
      let list;
      [list, i] = parseList(lines, i);
      out.push(list);
    } else if (line.includes("|") && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1])
               && lines[i + 1].includes("-")) {
      let table;
      [table, i] = parseTable(lines, i);
      out.push(table);
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() && (para.length === 0 || !startsBlock(lines[i])); i++) {
        para.push(lines[i].trim());
      }
      out.push(el("p", {}, ...inline(para.join("\n"))));
    }
  }
  return out;
}

/** A list starting at lines[start]; returns [element, index after it]. Items may nest. */
function parseList(lines, start) {
  const first = LIST_ITEM.exec(lines[start]);
  const ordered = /\d/.test(first[2]);
  const list = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) list.setAttribute("start", String(parseInt(first[2], 10)));
  let i = start;
  while (i < lines.length) {
    const m = LIST_ITEM.exec(lines[i]);
    if (!m || /\d/.test(m[2]) !== ordered || m[1].length > first[1].length + 1) break;
    const contentIndent = m[1].length + m[2].length + 1;
    const body = [m[3] || ""];
    let blank = false;
    for (i++; i < lines.length; i++) {
      const line = lines[i];
      const indent = line.length - line.trimStart().length;
      if (!line.trim()) {
        blank = true;
        body.push("");
      } else if (indent >= Math.min(contentIndent, first[1].length + 2)) {
        body.push(line.slice(Math.min(indent, contentIndent)));  // nested content
        blank = false;
      } else if (!blank && !startsBlock(line)) {
        body.push(line.trim());  // a lazy continuation of the item's paragraph
      } else {
        break;
      }
    }
    while (body.length && !body[body.length - 1].trim()) body.pop();
    const blocks = parseBlocks(body);
    const item = el("li");
    if (blocks.length && blocks[0].tagName === "P") item.append(...blocks.shift().childNodes);  // tight item
    item.append(...blocks);
    list.append(item);  // the inner loop stopped at a sibling item, another block, or the end
  }
  return [list, i];
}

function splitRow(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  return s.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function parseTable(lines, start) {
  const header = splitRow(lines[start]);
  const aligns = splitRow(lines[start + 1]).map((c) =>
    c.startsWith(":") && c.endsWith(":") ? "center" : c.endsWith(":") ? "right" : null);
  const cell = (tag, text, k) => el(tag, { class: aligns[k] ? `align-${aligns[k]}` : null }, ...inline(text));
  const head = el("thead", {}, el("tr", {}, ...header.map((t, k) => cell("th", t, k))));
  const body = el("tbody");
  let i = start + 2;
  for (; i < lines.length && lines[i].trim() && lines[i].includes("|"); i++) {
    const cells = splitRow(lines[i]);
    body.append(el("tr", {}, ...header.map((_, k) => cell("td", cells[k] || "", k))));
  }
  return [el("div", { class: "table-wrap" }, el("table", {}, head, body)), i];
}

function codeBlock(code, lang) {
  const copy = el("button", { type: "button", class: "copy", text: "Copy" });
  copy.addEventListener("click", () => {
    const done = (label) => { copy.textContent = label; setTimeout(() => { copy.textContent = "Copy"; }, 1500); };
    if (navigator.clipboard) navigator.clipboard.writeText(code).then(() => done("Copied"), () => done("Copy failed"));
    else done("Copy failed");
  });
  return el("div", { class: "code-block" },
    el("div", { class: "code-head" }, el("span", { text: lang || "code" }), copy),
    el("pre", {}, el("code", { class: lang ? `language-${lang}` : null, text: code })));
}

// Inline spans, tried at every position; the earliest match wins, ties go to the first pattern.
const SPANS = [
  [/`([^`\n]+)`/, (m) => el("code", { text: m[1] })],
  [/\*\*(?=\S)([\s\S]*?\S)\*\*|(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/, (m) => el("strong", {}, ...inline(m[1] ?? m[2]))],
  [/~~(?=\S)([\s\S]*?\S)~~/, (m) => el("del", {}, ...inline(m[1]))],
  [/\*(?=[^\s*])([^*]*?[^\s*])\*|(?<![\w])_(?=[^\s_])([^_]*?[^\s_])_(?![\w])/, (m) => el("em", {}, ...inline(m[1] ?? m[2]))],
  [/\[([^\]\n]+)\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"\n]*")?\s*\)/, (m) => link(m[2], inline(m[1]), m[0])],
  [/\bhttps?:\/\/[^\s<>()]*[^\s<>().,;:!?'"*_]/, (m) => link(m[0], [m[0]], m[0])],
];

function link(url, children, original) {
  let parsed = null;
  try { parsed = new URL(url); } catch (_) { /* relative or malformed: not a link */ }
  if (!parsed || !LINK_SCHEMES.has(parsed.protocol)) return document.createTextNode(original);
  return el("a", { href: parsed.href, target: "_blank", rel: "noopener noreferrer nofollow" }, ...children);
}

/** Inline markdown of `text` as an array of nodes; newlines become <br>. */
function inline(text) {
  const nodes = [];
  const pushText = (s) => s.split("\n").forEach((part, k) => {
    if (k) nodes.push(el("br"));
    if (part) nodes.push(document.createTextNode(part));
  });
  let rest = text;
  while (rest) {
    let best = null;
    for (const [re, make] of SPANS) {
      const m = re.exec(rest);
      if (m && (best === null || m.index < best.m.index)) best = { m, make };
    }
    if (!best) break;
    pushText(rest.slice(0, best.m.index));
    nodes.push(best.make(best.m));
    rest = rest.slice(best.m.index + best.m[0].length);
  }
  pushText(rest);
  return nodes;
}
