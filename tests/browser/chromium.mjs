// Debian's headless Chromium as every browser script here starts it (MUSTER_CHROMIUM, or
// /usr/bin/chromium): no sandbox (tests may run as root), no GPU, no QUIC, nothing fetched in
// the background.
import { chromium } from 'playwright-core';

export function launch() {
  return chromium.launch({
    executablePath: process.env.MUSTER_CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
}
