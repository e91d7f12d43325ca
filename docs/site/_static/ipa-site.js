// The language switch: a link, on every page, to the same page in the other language's book.
// docs/site/build.py replaces the placeholder below with "<path from this book's root to the other
// book's root>|<label>", or with nothing when only one language is built.
(function () {
  "use strict";
  const spec = "__OTHER_BOOK__";
  if (!spec.includes("|")) return;
  const [otherRoot, label] = spec.split("|");
  const otherPages = new Set(["__OTHER_PAGES__"]);  // the other book's pages, without .html
  function addSwitch() {
    // Sphinx writes the path from this page to the book's root into <html data-content_root>.
    const root = new URL(document.documentElement.dataset.content_root || "./", location.href);
    let page = location.pathname.slice(root.pathname.length) || "index.html";
    if (!otherPages.has(page.replace(/\.html$/, ""))) page = "index.html";  // not in the other book (yet)
    const link = document.createElement("a");
    link.className = "btn ipa-lang-switch";
    link.href = new URL(otherRoot + page + location.search, root).href;
    link.hreflang = otherRoot.startsWith("zh") ? "zh-CN" : "en";
    link.textContent = label;
    link.title = label;
    const bar = document.querySelector(".article-header-buttons");
    if (bar) bar.prepend(link); else document.body.prepend(link);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", addSwitch);
  else addSwitch();
})();
