"""The init step: plan and install the nat rules that make TCP transparent to the proxy."""
