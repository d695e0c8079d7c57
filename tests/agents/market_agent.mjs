// An external agent, as a team's game server would run one: it plays a small prediction market through the
// Ziggurat gateway with the official `openai` package, then reports each episode's reward after a delay
// (when its market "resolves"). One JSON line per call on stdout: what the client received.
//
//   node market_agent.mjs BASE_URL API_KEY RUN_NAME [COHORTS] [EPISODES_PER_COHORT] [REWARD_DELAY_MS]
import OpenAI from "openai";

const [baseURL, apiKey, run, cohorts = "2", perCohort = "3", delayMs = "500"] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${baseURL}/v1`, apiKey, maxRetries: 0, timeout: 120_000 });

async function rest(path, body) {
  const response = await fetch(`${baseURL}${path}`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${apiKey}` },
    body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(`${path}: ${response.status} ${JSON.stringify(answer)}`);
  return answer;
}

// The market resolves YES; an order is scored by how confidently its text leans that way (a stand-in for
// the game's real payout, computed here, outside Ziggurat, as the game would).
function payout(text) {
  const yes = (text.match(/[aeiouy]/gi) || []).length;
  return (yes % 5) / 4 - 0.5;
}

async function playEpisode(cohort, index) {
  const group = `${run}-market-${cohort}`;
  const { episode } = await rest("/v1/episodes", { group, agent: `trader-${index}`, metadata: { market: group } });
  const headers = { "X-Ziggurat-Episode": episode };
  const messages = [
    { role: "system", content: "You trade on a prediction market. Answer with one short order." },
    { role: "user", content: `Market ${cohort}: will it rain tomorrow? Price 0.${40 + index}.` },
  ];
  const replies = [];
  for (let turn = 0; turn < 2; turn++) {
    const { data, response } = await client.chat.completions
      .create({ model: "ziggurat", messages, max_tokens: 10, temperature: 1.0 }, { headers })
      .withResponse();
    const text = data.choices[0].message.content;
    replies.push(text);
    console.log(JSON.stringify({
      episode, turn, text, version: Number(response.headers.get("x-ziggurat-version")),
      step: Number(response.headers.get("x-ziggurat-step")),
    }));
    await rest(`/v1/episodes/${episode}/steps`, { action: { order: text.slice(0, 40) }, reward: 0 });
    messages.push({ role: "assistant", content: text }, { role: "user", content: "The price moved. Your next order?" });
  }
  await rest(`/v1/episodes/${episode}/end`, {});
  // Later traders pay a small fee, so no two rewards of a cohort are ever equal.
  return { episode, reward: payout(replies.join(" ")) - 0.01 * index };
}

const played = [];
for (let cohort = 0; cohort < Number(cohorts); cohort++) {
  const episodes = [];
  for (let index = 0; index < Number(perCohort); index++) episodes.push(playEpisode(cohort, index));
  played.push(...(await Promise.all(episodes)));
}
// Hours later in a real market; here a moment later, after every episode has ended.
await new Promise((resolve) => setTimeout(resolve, Number(delayMs)));
for (const { episode, reward } of played) await rest(`/v1/episodes/${episode}/reward`, { reward });
console.log(JSON.stringify({ done: played.length, rewards: played.map((p) => p.reward) }));
