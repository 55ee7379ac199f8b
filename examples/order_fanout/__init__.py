"""Order placed, fan-out: payment, inventory and notifications as durable groups."""
