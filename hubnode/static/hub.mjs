// hub.mjs: hub.js as an ES module.
//
//   import { HubClient } from "/hub.mjs";   // or: import HubClient from "/hub.mjs";
//
// hub.js is one file for both worlds: imported here for its side effect (it
// defines globalThis.HubClient, in a module as in a plain script), then
// re-exported, since a plain script cannot `export` and still load with <script>.
import "./hub.js";

export const HubClient = globalThis.HubClient;
export default HubClient;
