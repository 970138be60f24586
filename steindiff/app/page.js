() => {
  // The URL state: the run's settings as it starts, the shown step once its views have landed.
  window.steindiffLink = {
    settings(keys, values) {
      const query = new URLSearchParams();
      keys.forEach((key, i) => query.set(key, String(values[i])));
      window.history.replaceState(null, "", "?" + query.toString());
      return values;
    },
    step(k) {
      const query = new URLSearchParams(window.location.search);
      query.set("step", String(k));
      window.history.replaceState(null, "", "?" + query.toString());
      return k;
    },
  };

  // Plotly writes each clip-path as url('<page URL>#id') when the page has a <base> element (gradio's has), and
  // the page's URL changes with every run and step (the URL state): a figure drawn before a change would lose
  // its clipping, and a 2-D run's trajectories would spill across the other panel. Point them at the URL the
  // page has now, after every URL change and whenever plotly draws one.
  const here = () => window.location.href.split("#")[0];
  const fix = (element) => {
    const value = element.getAttribute("clip-path");
    if (value && value.startsWith("url(") && !value.includes(here() + "#")) {
      element.setAttribute("clip-path", value.replace(/url\((['"]?)[^#'")]*#/, `url($1${here()}#`));
    }
  };
  const fixAll = (root) => root.querySelectorAll("[clip-path]").forEach(fix);
  new MutationObserver((records) => {
    for (const record of records) {
      if (record.type === "attributes") fix(record.target);
      for (const node of record.addedNodes) {
        if (node.nodeType === Node.ELEMENT_NODE) {
          if (node.hasAttribute("clip-path")) fix(node);
          fixAll(node);
        }
      }
    }
  }).observe(document.body, { subtree: true, childList: true, attributes: true, attributeFilter: ["clip-path"] });
  const replaceState = history.replaceState.bind(history);
  history.replaceState = (...args) => {
    replaceState(...args);
    fixAll(document);
  };
}
