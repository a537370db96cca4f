// chat-gateway console: the little the pages need beyond HTML. Loaded from the gateway itself
// (the Content-Security-Policy allows no inline script).
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // A block's length does not apply to a permanent block: disable the field while it is ticked.
  for (const field of document.querySelectorAll("[data-off-when]")) {
    const box = document.getElementById(field.dataset.offWhen);
    if (!box) continue;
    const sync = () => { field.disabled = box.checked; };
    box.addEventListener("change", sync);
    sync();
  }
  // A form sent once: its buttons are disabled until the next page, so a double click acts once.
  for (const form of document.querySelectorAll("form[method=post]")) {
    form.addEventListener("submit", () => {
      setTimeout(() => { for (const b of form.querySelectorAll("button")) b.disabled = true; }, 0);
    });
  }
});
