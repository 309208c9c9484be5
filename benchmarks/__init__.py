"""lorahot benchmarks: swap and forward latency, side by side with PEFT. See README.md here."""
