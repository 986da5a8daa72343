"""RL core: future_kl, policy losses, advantages, rewards, train steps, trainer loop."""
