"""CRM webhooks: signatures, event validation, the inbox in the state store, the receiver."""
