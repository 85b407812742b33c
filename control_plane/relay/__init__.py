"""The EngineService relay that joins the frontend and engine processes: its message codec and item channel."""
