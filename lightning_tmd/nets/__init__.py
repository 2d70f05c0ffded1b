"""Plain nn.Modules (no Lightning): Wan split, text encoders, TMD student, discriminator."""
