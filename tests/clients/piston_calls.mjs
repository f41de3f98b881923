// Runs calls of the npm piston-client against a server (argv[2]) and prints each answer
// as one JSON line: what a judge or a bot written against Piston would see.
import { piston } from "piston-client";

const client = piston({ server: process.argv[2] });
const calls = JSON.parse(process.argv[3]);
for (const call of calls) {
  const answer = call.method === "runtimes"
    ? await client.runtimes()
    : await client.execute(call.language, call.code, call.options || {});
  console.log(JSON.stringify(answer));
}
