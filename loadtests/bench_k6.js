// Open-loop load for loadtests/bench.py: constant arrival rate against one target.
// Env: TARGET (base URL), RATE (requests/s), DURATION (e.g. "15s"), OUT (summary JSON path), USERS.
import http from "k6/http";

const rate = parseInt(__ENV.RATE, 10);
const users = parseInt(__ENV.USERS || "10000", 10);
const body = JSON.stringify({
  model: "gpt-4o-mini",
  messages: [
    { role: "system", content: "You are a helpful assistant." },
    { role: "user", content: "Hello! Could you tell me what the weather is usually like in Lisbon in May?" },
  ],
});

export const options = {
  discardResponseBodies: true,
  summaryTrendStats: ["avg", "p(50)", "p(95)", "p(99)", "max"],
  scenarios: {
    load: {
      executor: "constant-arrival-rate",
      rate: rate,
      timeUnit: "1s",
      duration: __ENV.DURATION,
      preAllocatedVUs: Math.max(20, Math.ceil(rate / 20)),
      maxVUs: Math.max(200, rate),
    },
  },
};

export default function () {
  const user = `bench-${Math.floor(Math.random() * users)}`;
  http.post(`${__ENV.TARGET}/v1/chat/completions`, body, {
    headers: { "Content-Type": "application/json", "X-User-ID": user, Authorization: "Bearer sk-bench" },
    timeout: "10s",
  });
}

export function handleSummary(data) {
  return { [__ENV.OUT]: JSON.stringify(data) };
}
